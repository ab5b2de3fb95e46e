"""Inventory formulas, checked by hand on small inputs."""

from __future__ import annotations

import pytest

from server.agents.inventory import (
    InventoryRequest,
    inventory_agent,
    lead_time_demand,
    plan_product,
    service_z,
)
from tests.agents.builders import demand_forecast, parameters, product_forecast
from tests.agents.conftest import Recorder

Z95 = 1.6448536


def test_z_of_the_service_level() -> None:
    """95 % -> 1.645, 99 % -> 2.326, 50 % -> 0."""
    assert service_z(0.95) == pytest.approx(Z95, abs=1e-6)
    assert service_z(0.99) == pytest.approx(2.3263479, abs=1e-6)
    assert service_z(0.5) == pytest.approx(0.0, abs=1e-12)


def test_one_product_by_hand() -> None:
    """Forecast 10, 20, 30, 40; RMSE 5; L = 2; 50 on hand; 95 %:
    SS = ceil(1.645 * 5 * sqrt 2) = ceil(11.63) = 12; lead-time demand 10 + 20 = 30;
    ROP = 42; order = ceil(100 + 12 - 50) = 62; cover 50 / 25 = 2 weeks."""
    plan = plan_product(product_forecast([10, 20, 30, 40]), Z95)
    assert plan.safety_stock == 12
    assert plan.lead_time_demand == 30
    assert plan.reorder_point == 42
    assert plan.horizon_demand == 100
    assert plan.order_quantity == 62
    assert plan.weekly_demand == 25
    assert plan.weeks_of_cover == 2.0
    assert plan.reorder_now is False


def test_error_scales_with_the_scenario() -> None:
    """A scenario factor of 1.2 makes sigma 6: SS = ceil(1.645 * 6 * sqrt 2) = ceil(13.96)."""
    plan = plan_product(product_forecast([10, 20, 30, 40], factor=1.2), Z95)
    assert plan.demand_sigma == 6.0
    assert plan.safety_stock == 14


def test_lead_time_beyond_the_horizon_repeats_the_mean_week() -> None:
    """L = 6 over a 4-week forecast of 100: 100 + 2 * 25 = 150."""
    assert lead_time_demand([10, 20, 30, 40], 6) == 150
    assert lead_time_demand([], 3) == 0
    plan = plan_product(product_forecast([10, 20, 30, 40], lead_time=6), Z95)
    assert plan.reorder_point == 150 + 21  # SS = ceil(1.645 * 5 * sqrt 6) = ceil(20.15)
    assert plan.reorder_now is True


def test_the_parameters_lead_time_overrides_the_products() -> None:
    """lead_time_weeks = 3 in the parameters: L = 3 whatever the product says."""
    plan = plan_product(product_forecast([10, 20, 30, 40], lead_time=8), Z95, 3)
    assert plan.lead_time_weeks == 3
    assert plan.lead_time_demand == 60
    assert plan.safety_stock == 15  # ceil(1.645 * 5 * sqrt 3) = ceil(14.25)


def test_enough_stock_orders_nothing() -> None:
    """500 on hand for a demand of 100: order 0, 20 weeks of cover."""
    plan = plan_product(product_forecast([10, 20, 30, 40], on_hand=500), Z95)
    assert plan.order_quantity == 0
    assert plan.weeks_of_cover == 20.0


async def test_agent_plans_every_product_and_reports_each(recorder: Recorder) -> None:
    """At 99 %: z = 2.326 for every product, one report per product, totals add up."""
    products = [
        product_forecast([10, 20, 30, 40], product_id="A"),
        product_forecast([5, 5, 5, 5], product_id="B", on_hand=0, rmse=1.0),
    ]
    request = InventoryRequest(
        parameters=parameters(service_level=0.99, horizon_weeks=4),
        forecast=demand_forecast(products, 4),
    )
    plan = await inventory_agent(request, recorder)

    assert plan.z == pytest.approx(2.3263, abs=1e-4)
    a, b = plan.products
    assert a.safety_stock == 17  # ceil(2.326 * 5 * sqrt 2) = ceil(16.45)
    assert b.safety_stock == 4  # ceil(2.326 * 1 * sqrt 2) = ceil(3.29)
    assert b.order_quantity == 24  # 20 + 4 - 0
    assert plan.total_order_quantity == a.order_quantity + b.order_quantity
    assert plan.total_safety_stock == 21
    assert plan.reorder_now == ["Widget B"]
    assert recorder.statuses[0].startswith("Planning stock at a 99.0% service level (z = 2.326)")
    assert [r.status.split(":")[0] for r in recorder.reports[1:]] == [
        "Inventory 1/2 Grills & BBQ · Widget A",
        "Inventory 2/2 Grills & BBQ · Widget B",
    ]
    assert plan.summary()["total_order_quantity"] == plan.total_order_quantity
