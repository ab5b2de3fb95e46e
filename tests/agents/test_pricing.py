"""Pricing formulas, checked by hand on small inputs."""

from __future__ import annotations

import pytest

from server.agents.pricing import PricingRequest, optimal_price, pricing_agent, recommend
from tests.agents.builders import demand_forecast, parameters, product_forecast
from tests.agents.conftest import Recorder


def test_lerner_optimum() -> None:
    """p* = c * e / (1 + e): 10 * -2 / -1 = 20; 10 * -1.5 / -0.5 = 30; none when e >= -1."""
    assert optimal_price(10, -2) == pytest.approx(20)
    assert optimal_price(10, -1.5) == pytest.approx(30)
    assert optimal_price(10, -0.8) is None
    assert optimal_price(10, -1.0) is None


def test_recommendation_inside_the_band_by_hand() -> None:
    """List 20, cost 10, e = -2, plan 18 (10 % off) selling 100: recommend 20, selling
    100 * (20 / 18) ** -2 = 81 for revenue 1,620 (-180) and margin 810 (+10)."""
    item = product_forecast([25, 25, 25, 25], scenario_price=18.0)
    plan = recommend(item)
    assert plan.recommended_price == 20.0
    assert plan.bound is None
    assert (plan.planned.units, plan.planned.revenue, plan.planned.margin) == (100, 1800, 800)
    assert plan.recommended.units == 81.0
    assert plan.recommended.revenue == 1620.0
    assert plan.recommended.margin == 810.0
    assert plan.revenue_change == -180.0 and plan.margin_change == 10.0
    assert plan.revenue_change_pct == -10.0 and plan.margin_change_pct == 1.25


@pytest.mark.parametrize(
    ("elasticity", "unit_cost", "price", "bound"),
    [
        (-1.5, 10.0, 24.0, "held at +20% of the list price"),  # p* = 30 > 24
        (-0.8, 10.0, 24.0, "demand is inelastic: the highest price in the band"),
        (-20.0, 10.0, 16.0, "held at -20% of the list price"),  # p* = 10.53 < 16
        (-50.0, 15.5, 16.28, "held at cost + 5%"),  # p* = 15.82 < 15.5 * 1.05 = 16.275
    ],
)
def test_recommendation_is_held_in_the_band(
    elasticity: float, unit_cost: float, price: float, bound: str
) -> None:
    """The optimum outside [list - 20 %, list + 20 %] or below cost + 5 % is held at the edge."""
    item = product_forecast([25, 25, 25, 25], elasticity=elasticity, unit_cost=unit_cost)
    plan = recommend(item)
    assert plan.recommended_price == price
    assert plan.bound == bound
    # at the edge the margin is better than at the planned price (or equal to it)
    assert plan.recommended.margin >= plan.planned.margin


async def test_agent_totals_and_reports(recorder: Recorder) -> None:
    """Totals are the sums of the products; one report per product."""
    products = [
        product_forecast([25, 25, 25, 25], product_id="A", scenario_price=18.0),
        product_forecast([10, 10, 10, 10], product_id="B", elasticity=-1.5),
    ]
    request = PricingRequest(parameters=parameters(), forecast=demand_forecast(products, 4))
    plan = await pricing_agent(request, recorder)

    a, b = plan.products
    assert plan.planned.revenue == pytest.approx(a.planned.revenue + b.planned.revenue)
    assert plan.recommended.margin == pytest.approx(a.recommended.margin + b.recommended.margin)
    assert plan.margin_change == pytest.approx(a.margin_change + b.margin_change, abs=0.02)
    assert len(recorder.reports) == 3
    assert recorder.reports[1].status.startswith(
        "Pricing 1/2 Grills & BBQ · Widget A: 20.00 instead of 18.00"
    )
    assert plan.summary()["recommended_prices"] == {"Widget A": 20.0, "Widget B": 24.0}
