"""Small hand-made forecasts for the inventory and pricing tests."""

from __future__ import annotations

from datetime import date, timedelta

from server.agents.demand import Backtest, DemandForecast, ProductForecast, SeriesForecast
from server.agents.history import ProductInfo
from server.agents.parameters import ForecastParameters


def product_forecast(
    forecast: list[float],
    *,
    product_id: str = "P-1",
    rmse: float = 5.0,
    factor: float = 1.0,
    on_hand: int = 50,
    lead_time: int = 2,
    list_price: float = 20.0,
    unit_cost: float = 10.0,
    elasticity: float = -2.0,
    scenario_price: float | None = None,
) -> ProductForecast:
    total = sum(forecast)
    return ProductForecast(
        product=ProductInfo(
            product_id=product_id,
            name=f"Widget {product_id}",
            category="grills",
            category_name="Grills & BBQ",
            list_price=list_price,
            unit_cost=unit_cost,
            on_hand=on_hand,
            lead_time_weeks=lead_time,
        ),
        method="holt_winters",
        elasticity=elasticity,
        promotion_uplift=0.2,
        scenario_price=list_price if scenario_price is None else scenario_price,
        scenario_factor=factor,
        series=SeriesForecast(
            history=[],
            forecast=forecast,
            lower=[0.8 * v for v in forecast],
            upper=[1.2 * v for v in forecast],
            total_units=total,
            total_lower=0.9 * total,
            total_upper=1.1 * total,
        ),
        backtest=Backtest(holdout_weeks=8, mape=5.0, naive_mape=7.0, rmse=rmse),
    )


def demand_forecast(products: list[ProductForecast], horizon: int) -> DemandForecast:
    start = date(2025, 12, 29)
    total = [sum(p.series.forecast[i] for p in products) for i in range(horizon)]
    return DemandForecast(
        category="grills",
        category_name="Grills & BBQ",
        channel="all",
        horizon_weeks=horizon,
        price_change_pct=0.0,
        promotion=False,
        model="hand-made",
        interval_level=0.9,
        history_weeks=[],
        forecast_weeks=[start + timedelta(weeks=i) for i in range(horizon)],
        products=products,
        total=SeriesForecast(
            history=[],
            forecast=total,
            lower=total,
            upper=total,
            total_units=sum(total),
            total_lower=sum(total),
            total_upper=sum(total),
        ),
        backtest=Backtest(holdout_weeks=8, mape=5.0, naive_mape=7.0, rmse=1.0),
    )


def parameters(**values: object) -> ForecastParameters:
    return ForecastParameters.model_validate({"product_category": "grills", **values})
