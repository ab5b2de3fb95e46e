"""The pricing agent: a recommended price per product, from its elasticity and margin.

Demand is taken as constant-elasticity around the planned price ``p0`` (the
list price after the strategy's price change), with the forecast units ``q0``
there and the category's estimated elasticity ``e``::

    units(p)  = q0 * (p / p0) ** e
    revenue   = p * units(p)
    margin    = (p - unit cost) * units(p)

For ``e < -1`` the margin is highest at ``p* = unit cost * e / (1 + e)`` (the
Lerner rule); for ``-1 <= e < 0`` it rises with the price without bound. The
recommendation is ``p*`` held within ``MAX_STEP`` (20 %) of the current list
price, a price move a retailer can make at once, and never below cost plus
``MIN_MARKUP``; since the margin is single-peaked, that is the best price in
the band. The expected units, revenue and margin of the plan and of the
recommendation, and their difference, are reported per product and in total,
over the forecast horizon (the promotion, if any, stays as planned).
"""

from __future__ import annotations

from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from .demand import DemandForecast, ProductForecast
from .handoff import Reporter
from .parameters import ForecastParameters

MAX_STEP = 0.20
MIN_MARKUP = 0.05


class PricingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    parameters: ForecastParameters
    forecast: DemandForecast


class PriceOutcome(BaseModel):
    """Expected results over the horizon at one price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    price: float
    units: float
    revenue: float
    margin: float


class ProductPricing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    product_id: str
    product: str
    unit_cost: float
    list_price: float
    elasticity: float
    optimal_price: float | None = Field(
        description="margin-maximising price without bounds; None when demand is inelastic"
    )
    recommended_price: float
    bound: str | None = Field(description="which limit held the recommendation, if any")
    planned: PriceOutcome
    recommended: PriceOutcome
    revenue_change: float
    margin_change: float
    revenue_change_pct: float | None
    margin_change_pct: float | None


class PricingPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    horizon_weeks: int
    max_step: float
    min_markup: float
    products: list[ProductPricing]
    planned: PriceOutcome = Field(description="totals at the planned prices (price = 0)")
    recommended: PriceOutcome = Field(description="totals at the recommended prices")
    revenue_change: float
    margin_change: float
    revenue_change_pct: float | None
    margin_change_pct: float | None

    def summary(self) -> dict[str, Any]:
        return {
            "products": len(self.products),
            "planned_revenue": round(self.planned.revenue),
            "recommended_revenue": round(self.recommended.revenue),
            "planned_margin": round(self.planned.margin),
            "recommended_margin": round(self.recommended.margin),
            "revenue_change_pct": self.revenue_change_pct,
            "margin_change_pct": self.margin_change_pct,
            "recommended_prices": {p.product: p.recommended_price for p in self.products},
        }


def _pct(new: float, old: float) -> float | None:
    return round((new - old) / abs(old) * 100.0, 2) if old else None


def outcome_at(price: float, planned_price: float, planned_units: float, elasticity: float,
               unit_cost: float) -> PriceOutcome:  # fmt: skip
    units = planned_units * (price / planned_price) ** elasticity
    return PriceOutcome(
        price=round(price, 2),
        units=round(units, 1),
        revenue=round(price * units, 2),
        margin=round((price - unit_cost) * units, 2),
    )


def optimal_price(unit_cost: float, elasticity: float) -> float | None:
    """The margin-maximising price of constant-elasticity demand (None if ``e >= -1``)."""
    if elasticity >= -1.0:
        return None
    return unit_cost * elasticity / (1.0 + elasticity)


def recommend(item: ProductForecast) -> ProductPricing:
    info = item.product
    low = max(info.list_price * (1.0 - MAX_STEP), info.unit_cost * (1.0 + MIN_MARKUP))
    high = max(info.list_price * (1.0 + MAX_STEP), low)
    best = optimal_price(info.unit_cost, item.elasticity)
    if best is None:
        price, bound = high, "demand is inelastic: the highest price in the band"
    elif best > high:
        price, bound = high, f"held at +{MAX_STEP:.0%} of the list price"
    elif best < low:
        price, bound = (
            low,
            (
                f"held at -{MAX_STEP:.0%} of the list price"
                if low == info.list_price * (1.0 - MAX_STEP)
                else f"held at cost + {MIN_MARKUP:.0%}"
            ),
        )
    else:
        price, bound = best, None
    price = round(price, 2)
    planned_price = item.scenario_price
    planned_units = item.series.total_units
    planned = outcome_at(
        planned_price, planned_price, planned_units, item.elasticity, info.unit_cost
    )
    recommended = outcome_at(price, planned_price, planned_units, item.elasticity, info.unit_cost)
    return ProductPricing(
        product_id=info.product_id,
        product=info.name,
        unit_cost=info.unit_cost,
        list_price=info.list_price,
        elasticity=item.elasticity,
        optimal_price=None if best is None else round(best, 2),
        recommended_price=price,
        bound=bound,
        planned=planned,
        recommended=recommended,
        **_changes(planned, recommended),
    )


class _Changes(TypedDict):
    revenue_change: float
    margin_change: float
    revenue_change_pct: float | None
    margin_change_pct: float | None


def _changes(planned: PriceOutcome, recommended: PriceOutcome) -> _Changes:
    """Revenue and margin at the recommended prices against the planned ones."""
    return {
        "revenue_change": round(recommended.revenue - planned.revenue, 2),
        "margin_change": round(recommended.margin - planned.margin, 2),
        "revenue_change_pct": _pct(recommended.revenue, planned.revenue),
        "margin_change_pct": _pct(recommended.margin, planned.margin),
    }


def _total(outcomes: list[PriceOutcome]) -> PriceOutcome:
    return PriceOutcome(
        price=0.0,
        units=round(sum(o.units for o in outcomes), 1),
        revenue=round(sum(o.revenue for o in outcomes), 2),
        margin=round(sum(o.margin for o in outcomes), 2),
    )


async def pricing_agent(request: PricingRequest, report: Reporter) -> PricingPlan:
    """``await pricing_agent(PricingRequest(...), report) -> PricingPlan``."""
    count = len(request.forecast.products)
    await report(
        f"Pricing {count} products from their elasticity and unit cost "
        f"(moves of at most {MAX_STEP:.0%})",
        10,
    )
    products: list[ProductPricing] = []
    for index, item in enumerate(request.forecast.products, start=1):
        plan = recommend(item)
        products.append(plan)
        await report(
            f"Pricing {index}/{count} {item.product.label}: {plan.recommended_price:,.2f} "
            f"instead of {plan.planned.price:,.2f}, margin {plan.margin_change:+,.0f} "
            f"over {request.forecast.horizon_weeks} weeks",
            10 + round(85 * index / count),
            plan.model_dump(mode="json"),
        )
    planned = _total([p.planned for p in products])
    recommended = _total([p.recommended for p in products])
    return PricingPlan(
        horizon_weeks=request.forecast.horizon_weeks,
        max_step=MAX_STEP,
        min_markup=MIN_MARKUP,
        products=products,
        planned=planned,
        recommended=recommended,
        **_changes(planned, recommended),
    )
