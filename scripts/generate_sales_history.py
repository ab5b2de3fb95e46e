"""Generate the shipped sales history: ``server/data/sales_history.csv`` and ``products.csv``.

The data is synthetic but built like a real home-and-garden retailer's weekly
sales, so that a forecast made from it can be checked by hand:

* 5 categories, 20 products (see ``CATALOG``), sold through 2 channels
  (``online`` and ``store``);
* 156 weeks (3 years) of weekly rows, each week starting on a Monday,
  from 2023-01-02 to 2025-12-22;
* expected units of a product in a week =
  ``base * (1 + growth) ** years * season(day of year) * (price / list price 2023) ** elasticity
  * (1 + promotion uplift if on promotion)``, where ``season`` is a smooth yearly
  curve ``exp(amplitude * cos(2 pi (day - peak day) / 365.25))`` plus, for some
  products, a holiday bump (a Gaussian around late November / December);
* noise: each channel's units are multiplied by a log-normal factor
  (``exp(N(0, sigma))``, ``sigma`` per category) and rounded to whole units;
* the online share of a category starts at ``online_share`` in 2023 and rises
  by 3.5 points a year;
* prices: a list price that rises by the category's yearly ``inflation`` each
  January; category-wide promotions of 2 or 3 weeks, about 5 a year, at a
  discount of 10-30 % (``promotion = 1``); and a few 4-week price tests of
  +-4-8 % on single products without a promotion. So the price moves for
  several reasons, which is what lets the demand agent estimate the price
  elasticity and the promotion uplift back from the data;
* ``products.csv`` holds each product's unit cost, stock on hand and supplier
  lead time (weeks), used by the inventory and pricing agents.

The true elasticities and promotion uplifts are in ``CATALOG``; the demand
agent does not read them, it estimates them from the CSV (docs/AGENTS.md).

Only ``random.Random(SEED).random()`` is used (normal draws by Box-Muller), whose
sequence Python guarantees across versions, so the output is byte-for-byte
reproducible::

    python scripts/generate_sales_history.py            # (re)write server/data/*.csv
    python scripts/generate_sales_history.py --check    # exit 1 if the shipped files differ
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import sys
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

SEED = 20240601
START = date(2023, 1, 2)  # a Monday
WEEKS = 156
DATA_DIR = Path(__file__).resolve().parent.parent / "server" / "data"
SALES_FILE = "sales_history.csv"
PRODUCTS_FILE = "products.csv"
SALES_COLUMNS = (
    "week",
    "category",
    "product_id",
    "product",
    "channel",
    "units",
    "price",
    "list_price",
    "promotion",
)
PRODUCT_COLUMNS = (
    "product_id",
    "product",
    "category",
    "category_name",
    "unit_cost",
    "list_price",
    "on_hand",
    "lead_time_weeks",
)


@dataclass(frozen=True)
class Product:
    product_id: str
    name: str
    list_price: float  # in 2023
    unit_cost: float
    base_units: float  # expected weekly units (both channels) at the seasonal mean in 2023
    growth: float  # yearly
    peak_day: int  # day of year of the seasonal peak
    amplitude: float  # of the yearly cosine, in log units
    holiday: float = 0.0  # extra log-units at the holiday bump
    on_hand: int = 0
    lead_time_weeks: int = 2


@dataclass(frozen=True)
class Category:
    slug: str
    name: str
    elasticity: float  # true price elasticity of demand
    promotion_uplift: float  # true extra demand during a promotion, beyond the price effect
    noise: float  # sigma of the log-normal noise
    online_share: float  # in 2023
    inflation: float  # yearly list price increase
    products: tuple[Product, ...]


CATALOG: tuple[Category, ...] = (
    Category(
        "outdoor_furniture", "Outdoor furniture", -1.8, 0.25, 0.10, 0.35, 0.02,
        (
            Product("OF-01", "Teak bench", 349.0, 180.0, 55, 0.14, 170, 0.95, 0.0, 240, 6),
            Product("OF-02", "Patio dining set", 899.0, 520.0, 22, 0.16, 160, 1.10, 0.0, 90, 8),
            Product("OF-03", "Sun lounger", 229.0, 110.0, 80, 0.12, 185, 1.05, 0.0, 420, 5),
            Product("OF-04", "Garden parasol", 149.0, 65.0, 110, 0.10, 180, 1.00, 0.0, 600, 4),
            Product("OF-05", "Rope hammock", 119.0, 50.0, 45, 0.18, 190, 0.90, 0.0, 150, 4),
        ),
    ),
    Category(
        "garden_tools", "Garden tools", -1.3, 0.20, 0.09, 0.40, 0.02,
        (
            Product("GT-01", "Cordless lawn mower", 399.0, 230.0, 40, 0.12, 120, 0.85, 0.0, 160, 6),
            Product("GT-02", "Pruning shears", 29.0, 11.0, 260, 0.06, 105, 0.60, 0.25, 1400, 3),
            Product("GT-03", "Expandable hose", 49.0, 20.0, 190, 0.08, 140, 0.75, 0.0, 900, 3),
            Product("GT-04", "Raised planter box", 89.0, 40.0, 70, 0.14, 110, 0.70, 0.0, 300, 4),
        ),
    ),
    Category(
        "grills", "Grills & BBQ", -1.5, 0.30, 0.10, 0.30, 0.025,
        (
            Product("GR-01", "Kettle grill", 179.0, 95.0, 75, 0.08, 175, 0.95, 0.20, 380, 5),
            Product("GR-02", "Gas grill 3-burner", 549.0, 330.0, 35, 0.10, 165, 1.00, 0.30, 140, 8),
            Product("GR-03", "Pizza oven", 299.0, 160.0, 30, 0.22, 190, 0.80, 0.45, 120, 6),
            Product("GR-04", "Grill cover", 39.0, 14.0, 150, 0.08, 170, 0.85, 0.0, 800, 2),
        ),
    ),
    Category(
        "heating", "Outdoor heating", -1.2, 0.20, 0.11, 0.25, 0.03,
        (
            Product("HE-01", "Patio heater", 259.0, 140.0, 45, 0.14, 350, 1.05, 0.0, 260, 6),
            Product("HE-02", "Steel fire pit", 189.0, 90.0, 60, 0.18, 300, 0.80, 0.25, 320, 5),
            Product("HE-03", "Wall heater", 329.0, 185.0, 25, -0.02, 10, 0.90, 0.0, 110, 7),
        ),
    ),
    Category(
        "lighting", "Outdoor lighting", -2.2, 0.25, 0.08, 0.45, 0.015,
        (
            Product("LI-01", "Solar path lights", 45.0, 18.0, 210, 0.10, 160, 0.55, 0.0, 1100, 3),
            Product("LI-02", "String lights", 35.0, 12.0, 320, 0.16, 200, 0.35, 0.90, 1800, 3),
            Product("LI-03", "Motion flood light", 79.0, 36.0, 90, 0.08, 300, 0.30, 0.20, 450, 4),
            Product("LI-04", "LED lantern", 25.0, 9.0, 180, 0.12, 190, 0.45, 0.40, 900, 2),
        ),
    ),
)  # fmt: skip

HOLIDAY_DAY = 340  # early December
HOLIDAY_WIDTH = 12.0  # days


class _Rng:
    """Uniform and normal draws from ``random.Random.random`` only (stable across Pythons)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._random.random()

    def integer(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``."""
        return low + min(int(self._random.random() * (high - low + 1)), high - low)

    def normal(self) -> float:
        u1 = 1.0 - self._random.random()  # in (0, 1]
        u2 = self._random.random()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _season(day: int, product: Product) -> float:
    cyc = math.cos(2.0 * math.pi * (day - product.peak_day) / 365.25)
    distance = min(abs(day - HOLIDAY_DAY), 365 - abs(day - HOLIDAY_DAY))
    bump = product.holiday * math.exp(-0.5 * (distance / HOLIDAY_WIDTH) ** 2)
    return math.exp(product.amplitude * cyc + bump)


def _promotion_calendar(rng: _Rng) -> dict[int, float]:
    """Week index -> discount (0.10-0.30) for one category: ~5 promotions of 2-3 weeks a year."""
    weeks: dict[int, float] = {}
    week = rng.integer(2, 8)
    while week < WEEKS:
        length = rng.integer(2, 3)
        discount = (10, 15, 20, 25, 30)[rng.integer(0, 4)] / 100.0
        for offset in range(length):
            if week + offset < WEEKS:
                weeks[week + offset] = discount
        week += length + rng.integer(6, 13)
    return weeks


def _price_tests(rng: _Rng) -> dict[int, float]:
    """Week index -> relative price change for one product: 3 tests of 4 weeks, +-4-8 %."""
    tests: dict[int, float] = {}
    for _ in range(3):
        start = rng.integer(0, WEEKS - 4)
        change = rng.uniform(0.04, 0.08) * (1 if rng.uniform(0.0, 1.0) < 0.5 else -1)
        for offset in range(4):
            tests[start + offset] = change
    return tests


def generate() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The sales rows and the product rows, as strings, in file order."""
    rng = _Rng(SEED)
    sales: list[dict[str, str]] = []
    products: list[dict[str, str]] = []
    for category in CATALOG:
        promotions = _promotion_calendar(rng)
        for product in category.products:
            tests = _price_tests(rng)
            list_price_now = round(product.list_price * (1 + category.inflation) ** 2, 2)
            products.append(
                {
                    "product_id": product.product_id,
                    "product": product.name,
                    "category": category.slug,
                    "category_name": category.name,
                    "unit_cost": f"{product.unit_cost:.2f}",
                    "list_price": f"{list_price_now:.2f}",
                    "on_hand": str(product.on_hand),
                    "lead_time_weeks": str(product.lead_time_weeks),
                }
            )
            for t in range(WEEKS):
                day_0 = START + timedelta(weeks=t)
                years = t / 52.0
                year_index = day_0.year - START.year
                list_price = round(product.list_price * (1 + category.inflation) ** year_index, 2)
                discount = promotions.get(t)
                if discount is not None:
                    price = round(list_price * (1 - discount), 2)
                else:
                    price = round(list_price * (1 + tests.get(t, 0.0)), 2)
                mean = (
                    product.base_units
                    * (1 + product.growth) ** years
                    * _season(day_0.timetuple().tm_yday + 3, product)
                    * (price / product.list_price) ** category.elasticity
                    * (1 + category.promotion_uplift if discount is not None else 1.0)
                )
                share = min(category.online_share + 0.035 * years, 0.9)
                for channel, part in (("online", share), ("store", 1 - share)):
                    noise = math.exp(category.noise * rng.normal())
                    sales.append(
                        {
                            "week": day_0.isoformat(),
                            "category": category.slug,
                            "product_id": product.product_id,
                            "product": product.name,
                            "channel": channel,
                            "units": str(max(0, round(mean * part * noise))),
                            "price": f"{price:.2f}",
                            "list_price": f"{list_price:.2f}",
                            "promotion": "1" if discount is not None else "0",
                        }
                    )
    return sales, products


def _to_csv(rows: list[dict[str, str]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="where to write the CSVs")
    parser.add_argument(
        "--check", action="store_true", help="compare with the files in --out-dir, write nothing"
    )
    args = parser.parse_args(argv)
    sales, products = generate()
    files = {
        SALES_FILE: _to_csv(sales, SALES_COLUMNS),
        PRODUCTS_FILE: _to_csv(products, PRODUCT_COLUMNS),
    }
    out_dir: Path = args.out_dir
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (out_dir / name).exists() or (out_dir / name).read_text("utf-8") != text
        ]
        for name in stale:
            print(f"{out_dir / name} differs from what the generator makes", file=sys.stderr)
        return 1 if stale else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text, "utf-8")
        print(f"wrote {out_dir / name} ({text.count(chr(10)) - 1} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
