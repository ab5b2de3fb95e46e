"""The inventory agent: safety stock, reorder point and order quantity per product.

For each product of the demand forecast, at the service level ``SL`` of the
parameters (default 95 %)::

    z                = inverse standard normal CDF of SL          (95 % -> 1.645)
    L                = lead time in weeks (the parameters', else the product's own)
    sigma            = backtest RMSE (units/week) * scenario factor
                       (the measured weekly forecast error, scaled to the scenario's level)
    safety stock     = ceil(z * sigma * sqrt(L))
    lead-time demand = forecast units of the first L weeks
                       (beyond the horizon: the mean forecast week, repeated)
    reorder point    = ceil(lead-time demand + safety stock)
    order quantity   = max(0, ceil(horizon demand + safety stock - on hand))
    weeks of cover   = on hand / mean forecast week

i.e. an order-up-to policy for the horizon: order enough to meet the forecast
and keep the safety stock, counting the stock on hand (``products.csv``).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .demand import DemandForecast, ProductForecast
from .handoff import Reporter
from .parameters import ForecastParameters

METHOD = (
    "safety stock = z * sigma * sqrt(L), sigma = backtest RMSE per week scaled to the scenario; "
    "reorder point = lead-time demand + safety stock; "
    "order quantity = horizon demand + safety stock - on hand"
)


class InventoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    parameters: ForecastParameters
    forecast: DemandForecast


class ProductInventory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    product_id: str
    product: str
    on_hand: int
    lead_time_weeks: int
    weekly_demand: float = Field(description="mean forecast units per week over the horizon")
    demand_sigma: float = Field(description="weekly forecast error used, units")
    lead_time_demand: float
    horizon_demand: float
    safety_stock: int
    reorder_point: int
    order_quantity: int
    weeks_of_cover: float | None = Field(description="on hand / weekly demand")
    reorder_now: bool = Field(description="on hand is at or below the reorder point")


class InventoryPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    service_level: float
    z: float
    horizon_weeks: int
    method: str
    products: list[ProductInventory]
    total_order_quantity: int
    total_safety_stock: int
    reorder_now: list[str] = Field(description="products to reorder now")

    def summary(self) -> dict[str, Any]:
        return {
            "service_level": self.service_level,
            "z": round(self.z, 3),
            "products": len(self.products),
            "total_order_quantity": self.total_order_quantity,
            "total_safety_stock": self.total_safety_stock,
            "reorder_now": self.reorder_now,
        }


def service_z(service_level: float) -> float:
    """The standard normal quantile of the service level (0.95 -> 1.6449)."""
    return NormalDist().inv_cdf(service_level)


def lead_time_demand(forecast: list[float], lead_time: int) -> float:
    """Forecast units of the first ``lead_time`` weeks; beyond the horizon, the mean week."""
    if not forecast:
        return 0.0
    covered = sum(forecast[:lead_time])
    extra = max(0, lead_time - len(forecast))
    return covered + extra * (sum(forecast) / len(forecast))


def plan_product(
    item: ProductForecast, z: float, lead_time_override: int | None = None
) -> ProductInventory:
    info = item.product
    lead_time = lead_time_override or info.lead_time_weeks
    forecast = item.series.forecast
    weekly = sum(forecast) / len(forecast) if forecast else 0.0
    sigma = item.backtest.rmse * item.scenario_factor
    safety = math.ceil(z * sigma * math.sqrt(lead_time))
    during_lead_time = lead_time_demand(forecast, lead_time)
    horizon_demand = sum(forecast)
    reorder_point = math.ceil(during_lead_time + safety)
    return ProductInventory(
        product_id=info.product_id,
        product=info.name,
        on_hand=info.on_hand,
        lead_time_weeks=lead_time,
        weekly_demand=round(weekly, 1),
        demand_sigma=round(sigma, 2),
        lead_time_demand=round(during_lead_time, 1),
        horizon_demand=round(horizon_demand, 1),
        safety_stock=safety,
        reorder_point=reorder_point,
        order_quantity=max(0, math.ceil(horizon_demand + safety - info.on_hand)),
        weeks_of_cover=round(info.on_hand / weekly, 1) if weekly > 0 else None,
        reorder_now=info.on_hand <= reorder_point,
    )


async def inventory_agent(request: InventoryRequest, report: Reporter) -> InventoryPlan:
    """``await inventory_agent(InventoryRequest(...), report) -> InventoryPlan``."""
    params = request.parameters
    z = service_z(params.service_level)
    lead = (
        f"lead time {params.lead_time_weeks} weeks"
        if params.lead_time_weeks
        else "each product's supplier lead time"
    )
    await report(
        f"Planning stock at a {params.service_level:.1%} service level (z = {z:.3f}), {lead}",
        10,
        {"service_level": params.service_level, "z": round(z, 4)},
    )
    products: list[ProductInventory] = []
    count = len(request.forecast.products)
    for index, item in enumerate(request.forecast.products, start=1):
        plan = plan_product(item, z, params.lead_time_weeks)
        products.append(plan)
        await report(
            f"Inventory {index}/{count} {item.product.label}: safety stock "
            f"{plan.safety_stock:,}, reorder point {plan.reorder_point:,}, order "
            f"{plan.order_quantity:,} ({plan.on_hand:,} on hand, {plan.lead_time_weeks}-week "
            "lead time)",
            10 + round(85 * index / count),
            plan.model_dump(mode="json"),
        )
    return InventoryPlan(
        service_level=params.service_level,
        z=round(z, 4),
        horizon_weeks=request.forecast.horizon_weeks,
        method=METHOD,
        products=products,
        total_order_quantity=sum(p.order_quantity for p in products),
        total_safety_stock=sum(p.safety_stock for p in products),
        reorder_now=[p.product for p in products if p.reorder_now],
    )
