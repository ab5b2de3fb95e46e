"""The shipped sales history (``server/data``), and what the agents estimate from it.

``sales_history.csv`` holds one row per week, product and channel (units sold,
selling price, list price, promotion flag); ``products.csv`` one row per
product (unit cost, current list price, stock on hand, supplier lead time).
``scripts/generate_sales_history.py`` made both; docs/AGENTS.md describes them.

:meth:`SalesHistory.effects` estimates, per category, the price elasticity of
demand and the promotion uplift with one pooled least-squares regression::

    log(units) = e * log(price) + log(1 + u) * promotion
                 + per product: intercept + trend + 3 yearly harmonics + noise

so that the seasonal curve, the growth and the promotions are told apart from
the price effect. ``e`` is clamped to [-4, -0.3] and ``u`` to [0, 1.5].
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from .parameters import CATEGORIES, CATEGORY_NAMES, Category, CategoryChoice, Channel

FloatArray = npt.NDArray[np.float64]
SALES_FILE = "sales_history.csv"
PRODUCTS_FILE = "products.csv"
CHANNELS: tuple[Literal["online", "store"], ...] = ("online", "store")
ELASTICITY_BOUNDS = (-4.0, -0.3)
UPLIFT_BOUNDS = (0.0, 1.5)
HARMONICS = 3


class ProductInfo(BaseModel):
    """One product as the catalog knows it (``products.csv``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    product_id: str
    name: str
    category: Category
    category_name: str
    list_price: float  # current, i.e. at the end of the history
    unit_cost: float
    on_hand: int
    lead_time_weeks: int

    @property
    def label(self) -> str:
        return f"{self.category_name} · {self.name}"


@dataclass(frozen=True, slots=True)
class CategoryEffects:
    """Price elasticity and promotion uplift of one category, as estimated from the data."""

    elasticity: float
    promotion_uplift: float  # 0.25 means +25 % units while on promotion
    weeks_used: int


@dataclass(frozen=True, slots=True)
class ProductHistory:
    info: ProductInfo
    online: FloatArray
    store: FloatArray
    price: FloatArray
    list_price: FloatArray
    promotion: FloatArray  # 1.0 on promotion weeks, else 0.0

    def units(self, channel: Channel) -> FloatArray:
        if channel == "online":
            return self.online
        if channel == "store":
            return self.store
        return self.online + self.store


@dataclass(frozen=True, slots=True)
class SalesHistory:
    weeks: tuple[date, ...]
    products: tuple[ProductHistory, ...]
    _effects: dict[tuple[str, int], CategoryEffects] = field(default_factory=dict, repr=False)

    def select(self, category: CategoryChoice) -> list[ProductHistory]:
        return [p for p in self.products if category in ("all", p.info.category)]

    def effects(self, category: str, weeks: int | None = None) -> CategoryEffects:
        """Elasticity and uplift of ``category`` from its first ``weeks`` weeks (all by default).

        Cached: the backtest asks for the effects without its holdout, so that the
        holdout is never used to fit what is checked against it.
        """
        n = len(self.weeks) if weeks is None else weeks
        key = (category, n)
        cached = self._effects.get(key)
        if cached is None:
            members = [p for p in self.products if p.info.category == category]
            cached = estimate_effects(members, self.weeks[:n])
            self._effects[key] = cached
        return cached


def estimate_effects(products: Sequence[ProductHistory], weeks: Sequence[date]) -> CategoryEffects:
    """Pooled regression of log units on log price and promotion (see the module docstring)."""
    n = len(weeks)
    k = len(products)
    day = np.array([w.timetuple().tm_yday + 3 for w in weeks], dtype=np.float64)  # mid-week
    trend = np.arange(n, dtype=np.float64) / 52.0
    per_product = 2 + 2 * HARMONICS
    rows: list[FloatArray] = []
    targets: list[FloatArray] = []
    for i, product in enumerate(products):
        block = np.zeros((n, 2 + k * per_product))
        block[:, 0] = np.log(product.price[:n])
        block[:, 1] = product.promotion[:n]
        base = 2 + i * per_product
        block[:, base] = 1.0
        block[:, base + 1] = trend
        for h in range(1, HARMONICS + 1):
            angle = 2.0 * math.pi * h * day / 365.25
            block[:, base + 2 * h] = np.sin(angle)
            block[:, base + 2 * h + 1] = np.cos(angle)
        rows.append(block)
        targets.append(np.log(np.maximum(product.units("all")[:n], 0.5)))
    design = np.vstack(rows)
    target = np.concatenate(targets)
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    elasticity = float(np.clip(coefficients[0], *ELASTICITY_BOUNDS))
    uplift = float(np.clip(math.exp(float(coefficients[1])) - 1.0, *UPLIFT_BOUNDS))
    return CategoryEffects(round(elasticity, 4), round(uplift, 4), n)


def data_dir() -> Path:
    """``server/data``, where the shipped CSVs live (package data, see pyproject.toml)."""
    return Path(__file__).resolve().parent.parent / "data"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@lru_cache(maxsize=4)
def load_history(directory: Path | None = None) -> SalesHistory:
    """Read the CSVs once (cached per directory)."""
    directory = data_dir() if directory is None else directory
    infos: dict[str, ProductInfo] = {}
    for row in _read_csv(directory / PRODUCTS_FILE):
        if row["category"] not in CATEGORIES:
            raise ValueError(f"unknown category {row['category']!r} in {PRODUCTS_FILE}")
        infos[row["product_id"]] = ProductInfo(
            product_id=row["product_id"],
            name=row["product"],
            category=row["category"],  # type: ignore[arg-type]  # checked just above
            category_name=CATEGORY_NAMES[row["category"]],
            list_price=float(row["list_price"]),
            unit_cost=float(row["unit_cost"]),
            on_hand=int(row["on_hand"]),
            lead_time_weeks=int(row["lead_time_weeks"]),
        )
    weeks: dict[date, None] = {}
    columns: dict[str, dict[str, dict[date, float]]] = {
        pid: {"online": {}, "store": {}, "price": {}, "list_price": {}, "promotion": {}}
        for pid in infos
    }
    for row in _read_csv(directory / SALES_FILE):
        week = date.fromisoformat(row["week"])
        weeks[week] = None
        product = columns[row["product_id"]]
        product[row["channel"]][week] = float(row["units"])
        product["price"][week] = float(row["price"])
        product["list_price"][week] = float(row["list_price"])
        product["promotion"][week] = float(row["promotion"])
    ordered = tuple(sorted(weeks))

    def array(values: dict[date, float], name: str, pid: str) -> FloatArray:
        missing = [w for w in ordered if w not in values]
        if missing:
            raise ValueError(f"{pid} has no {name} for week {missing[0]}")
        return np.array([values[w] for w in ordered], dtype=np.float64)

    products = tuple(
        ProductHistory(
            info=info,
            online=array(columns[pid]["online"], "online units", pid),
            store=array(columns[pid]["store"], "store units", pid),
            price=array(columns[pid]["price"], "price", pid),
            list_price=array(columns[pid]["list_price"], "list price", pid),
            promotion=array(columns[pid]["promotion"], "promotion flag", pid),
        )
        for pid, info in infos.items()
    )
    return SalesHistory(weeks=ordered, products=products)
