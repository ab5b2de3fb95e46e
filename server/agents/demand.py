"""The demand agent: a weekly forecast per product of the chosen category, under the scenario.

For each product of ``params.product_category`` (sold through ``params.channel``):

1. Take the price and promotion effects out of its history:
   ``baseline = units * (list price now / price) ** e / (1 + u * promotion)``, where the
   elasticity ``e`` and the uplift ``u`` of its category are estimated from the data
   (:mod:`server.agents.history`).
2. Fit Holt-Winters to the baseline in a worker process (:mod:`server.agents.forecasting`)
   and forecast ``horizon_weeks``, with simulated paths for a 90 % prediction interval.
3. Put the scenario back in: every forecast week is multiplied by
   ``(1 + price_change_pct / 100) ** e`` and, with a promotion, by ``1 + u``.
4. Backtest: the same model fitted without the last ``holdout`` weeks forecasts them
   (with the prices and promotions those weeks really had); the MAPE against what was
   sold, next to the seasonal-naive model's MAPE, per product and for the total.

The fits run in worker processes (:mod:`server.agents.fit_pool`), so the event
loop stays free. The agent reports each product as it finishes, with its numbers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import numpy as np
import numpy.ma  # np.quantile imports it on first use, in the event loop: 10+ ms
from pydantic import BaseModel, ConfigDict, Field

from .fit_pool import ForecastExecutor
from .forecasting import (
    FitJob,
    FitOutcome,
    FloatArray,
    Method,
    mape,
    rmse,
)
from .handoff import Reporter
from .history import ProductHistory, ProductInfo, SalesHistory, load_history
from .parameters import CategoryChoice, Channel, ForecastParameters

log = logging.getLogger(__name__)

INTERVAL_LEVEL = 0.90
SIMULATIONS = 1000
HISTORY_TAIL_WEEKS = 52
MODEL_NAME = (
    "Holt-Winters exponential smoothing on log(1 + units): additive damped trend, "
    "additive 52-week seasonality"
)


def holdout_weeks(horizon: int) -> int:
    """Backtest holdout: the horizon, but at least 8 and at most 26 weeks."""
    return min(max(horizon, 8), 26)


# --- the result -----------------------------------------------------------------------------


def _round(values: FloatArray | list[float], digits: int = 1) -> list[float]:
    return [round(float(v), digits) for v in values]


class SeriesForecast(BaseModel):
    """Weekly units: the tail of the history, and the forecast with its interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history: list[float] = Field(description="units sold in the weeks of history_weeks")
    forecast: list[float] = Field(description="point forecast (median) per forecast week")
    lower: list[float] = Field(description="lower bound of the prediction interval per week")
    upper: list[float] = Field(description="upper bound of the prediction interval per week")
    total_units: float
    total_lower: float
    total_upper: float


class Backtest(BaseModel):
    """Forecast error on the last ``holdout_weeks`` of the history, fitted without them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    holdout_weeks: int
    mape: float | None = Field(description="mean absolute percentage error, percent")
    naive_mape: float | None = Field(description="the seasonal-naive model's MAPE, percent")
    rmse: float = Field(description="root mean squared error, units per week")


class ProductForecast(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    product: ProductInfo
    method: Method
    elasticity: float = Field(description="price elasticity of demand of the category")
    promotion_uplift: float = Field(description="0.25 means +25 % units while on promotion")
    scenario_price: float = Field(description="list price after the price change")
    scenario_factor: float = Field(description="price effect times promotion effect")
    series: SeriesForecast
    backtest: Backtest
    notes: list[str] = Field(default_factory=list)


class DemandForecast(BaseModel):
    """The demand agent's result: per product and in total, drawable as a chart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: CategoryChoice
    category_name: str
    channel: Channel
    horizon_weeks: int
    price_change_pct: float
    promotion: bool
    model: str
    interval_level: float
    history_weeks: list[date]
    forecast_weeks: list[date]
    products: list[ProductForecast]
    total: SeriesForecast
    backtest: Backtest

    def summary(self) -> dict[str, Any]:
        top = sorted(self.products, key=lambda p: p.series.total_units, reverse=True)[:5]
        return {
            "category": self.category_name,
            "channel": self.channel,
            "horizon_weeks": self.horizon_weeks,
            "products": len(self.products),
            "total_units": round(self.total.total_units),
            "interval": [round(self.total.total_lower), round(self.total.total_upper)],
            "interval_level": self.interval_level,
            "backtest_mape": self.backtest.mape,
            "naive_mape": self.backtest.naive_mape,
            "top_products": [
                {"product": p.product.name, "units": round(p.series.total_units)} for p in top
            ],
        }


# --- the agent ------------------------------------------------------------------------------


def _quantiles(paths: FloatArray) -> tuple[FloatArray, FloatArray]:
    tail = (1.0 - INTERVAL_LEVEL) / 2.0
    lower, upper = np.quantile(paths, [tail, 1.0 - tail], axis=0)
    return lower, upper


def _series(history: FloatArray, point: FloatArray, paths: FloatArray) -> SeriesForecast:
    lower, upper = _quantiles(paths)
    total_lower, total_upper = _quantiles(paths.sum(axis=1))
    return SeriesForecast(
        history=_round(history),
        forecast=_round(point),
        lower=_round(lower),
        upper=_round(upper),
        total_units=round(float(point.sum()), 1),
        total_lower=round(float(total_lower), 1),
        total_upper=round(float(total_upper), 1),
    )


def _backtest(
    holdout: int, actual: FloatArray, predicted: FloatArray, naive: FloatArray
) -> Backtest:
    model_mape = mape(actual, predicted)
    naive_mape = mape(actual, naive)
    return Backtest(
        holdout_weeks=holdout,
        mape=None if model_mape is None else round(model_mape, 2),
        naive_mape=None if naive_mape is None else round(naive_mape, 2),
        rmse=round(rmse(actual, predicted), 2),
    )


def _fmt_units(value: float) -> str:
    return f"{round(value):,}"


class _Prepared:
    """One product's series, effects and job, ready to be sent to a worker."""

    def __init__(
        self, product: ProductHistory, history: SalesHistory, params: ForecastParameters, seed: int
    ) -> None:
        n = len(history.weeks)
        self.holdout = holdout_weeks(params.horizon_weeks)
        category = product.info.category
        full = history.effects(category)
        train = history.effects(category, n - self.holdout)
        self.product = product
        self.units = product.units(params.channel)
        self.elasticity = full.elasticity
        self.uplift = full.promotion_uplift
        list_now = float(product.list_price[-1])
        relative_price = product.price / list_now
        effect = relative_price**full.elasticity * (1.0 + full.promotion_uplift * product.promotion)
        train_effect = relative_price**train.elasticity * (
            1.0 + train.promotion_uplift * product.promotion
        )
        self.holdout_effect = train_effect[n - self.holdout :]
        price_ratio = 1.0 + params.price_change_pct / 100.0
        self.scenario_price = round(product.info.list_price * price_ratio, 2)
        self.factor = price_ratio**full.elasticity * (
            1.0 + full.promotion_uplift if params.promotion else 1.0
        )
        self.job = FitJob(
            key=product.info.product_id,
            baseline=self.units / effect,
            train_baseline=(self.units / train_effect)[: n - self.holdout],
            horizon=params.horizon_weeks,
            holdout=self.holdout,
            repetitions=SIMULATIONS,
            seed=seed,
        )


class DemandAgent:
    """``await agent(params, report) -> DemandForecast`` (see the module docstring)."""

    def __init__(
        self,
        executor: ForecastExecutor,
        load: Callable[[], SalesHistory] = load_history,
    ) -> None:
        self._executor = executor
        self._load = load
        # One thread reads the history at a time: the first workflows after a start would
        # each parse the CSVs at once (the cache fills only when one is done), and threads
        # parsing side by side kept the event loop waiting for the GIL (125 ms with 20).
        self._loading = asyncio.Lock()

    async def __call__(self, params: ForecastParameters, report: Reporter) -> DemandForecast:
        async with self._loading:
            history = await asyncio.to_thread(self._load)
        products = history.select(params.product_category)
        if not products:
            raise ValueError(f"no products in category {params.product_category!r}")
        channel = "online + store" if params.channel == "all" else params.channel
        scope = (
            "all categories"
            if params.product_category == "all"
            else f"category {params.category_name}"
        )
        await report(
            f"Loaded {len(history.weeks)} weeks of {channel} sales: {len(products)} products, "
            f"{scope}",
            2,
            {"weeks": len(history.weeks), "products": len(products), "channel": params.channel},
        )
        prepared = await asyncio.to_thread(
            lambda: [
                _Prepared(product, history, params, seed=index + 1)
                for index, product in enumerate(products)
            ]
        )
        effects = {p.product.info.category_name: (p.elasticity, p.uplift) for p in prepared}
        await report(
            "Estimated from the data: "
            + "; ".join(
                f"{name} price elasticity {e:.2f}, promotion uplift {u:+.0%}"
                for name, (e, u) in effects.items()
            ),
            5,
            {"effects": {n: {"elasticity": e, "uplift": u} for n, (e, u) in effects.items()}},
        )

        outcomes: dict[str, ProductForecast] = {}
        points: dict[str, FloatArray] = {}
        paths: dict[str, FloatArray] = {}
        backtests: dict[str, tuple[FloatArray, FloatArray]] = {}
        by_key = {p.job.key: p for p in prepared}
        tasks = [asyncio.ensure_future(self._executor.fit(p.job)) for p in prepared]
        try:
            for done, next_outcome in enumerate(asyncio.as_completed(tasks), start=1):
                outcome = await next_outcome
                item = by_key[outcome.key]
                forecast, product_paths, predicted, naive = self._scenario(item, outcome)
                points[outcome.key] = forecast
                paths[outcome.key] = product_paths
                backtests[outcome.key] = (predicted, naive)
                outcomes[outcome.key] = result = ProductForecast(
                    product=item.product.info,
                    method=outcome.method,
                    elasticity=item.elasticity,
                    promotion_uplift=item.uplift,
                    scenario_price=item.scenario_price,
                    scenario_factor=round(item.factor, 4),
                    series=_series(item.units[-HISTORY_TAIL_WEEKS:], forecast, product_paths),
                    backtest=_backtest(item.holdout, item.units[-item.holdout :], predicted, naive),
                    notes=list(outcome.notes),
                )
                for note in outcome.notes:
                    log.info("demand: %s: %s", item.product.info.name, note)
                await report(
                    f"Forecasting {done}/{len(prepared)} {item.product.info.label}: "
                    f"{_fmt_units(result.series.total_units)} units over "
                    f"{params.horizon_weeks} weeks (backtest MAPE "
                    f"{_fmt_pct(result.backtest.mape)})",
                    5 + round(90 * done / len(prepared)),
                    {
                        "product": item.product.info.name,
                        "product_id": item.product.info.product_id,
                        "done": done,
                        "of": len(prepared),
                        "units": round(result.series.total_units),
                        "lower": round(result.series.total_lower),
                        "upper": round(result.series.total_upper),
                        "backtest_mape": result.backtest.mape,
                        "method": outcome.method,
                    },
                )
        finally:
            for task in tasks:
                task.cancel()

        ordered = [outcomes[p.job.key] for p in prepared]
        # Summing every product's simulated paths: 5 to 6 ms of CPU, off the event loop.
        forecast_result = await asyncio.to_thread(
            self._assemble, params, history, prepared, ordered, points, paths, backtests
        )
        total = forecast_result.total
        await report(
            f"Forecast ready: {_fmt_units(total.total_units)} units over "
            f"{params.horizon_weeks} weeks ({INTERVAL_LEVEL:.0%} interval "
            f"{_fmt_units(total.total_lower)}-{_fmt_units(total.total_upper)}); backtest MAPE "
            f"{_fmt_pct(forecast_result.backtest.mape)} vs "
            f"{_fmt_pct(forecast_result.backtest.naive_mape)} for the seasonal-naive model",
            99,
            forecast_result.summary(),
        )
        return forecast_result

    @staticmethod
    def _scenario(
        item: _Prepared, outcome: FitOutcome
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        forecast = outcome.point * item.factor
        product_paths = outcome.paths.astype(np.float64) * item.factor
        predicted = outcome.backtest * item.holdout_effect
        naive = outcome.naive_backtest * item.holdout_effect
        return forecast, product_paths, predicted, naive

    @staticmethod
    def _assemble(
        params: ForecastParameters,
        history: SalesHistory,
        prepared: list[_Prepared],
        products: list[ProductForecast],
        points: dict[str, FloatArray],
        paths: dict[str, FloatArray],
        backtests: dict[str, tuple[FloatArray, FloatArray]],
    ) -> DemandForecast:
        keys = [p.job.key for p in prepared]
        total_history = np.sum([p.units[-HISTORY_TAIL_WEEKS:] for p in prepared], axis=0)
        total_point = np.sum([points[k] for k in keys], axis=0)
        total_paths = np.sum([paths[k] for k in keys], axis=0)
        holdout = prepared[0].holdout
        total_actual = np.sum([p.units[-holdout:] for p in prepared], axis=0)
        total_predicted = np.sum([backtests[k][0] for k in keys], axis=0)
        total_naive = np.sum([backtests[k][1] for k in keys], axis=0)
        last = history.weeks[-1]
        return DemandForecast(
            category=params.product_category,
            category_name=params.category_name,
            channel=params.channel,
            horizon_weeks=params.horizon_weeks,
            price_change_pct=params.price_change_pct,
            promotion=params.promotion,
            model=MODEL_NAME,
            interval_level=INTERVAL_LEVEL,
            history_weeks=list(history.weeks[-HISTORY_TAIL_WEEKS:]),
            forecast_weeks=[last + timedelta(weeks=h) for h in range(1, params.horizon_weeks + 1)],
            products=products,
            total=_series(total_history, total_point, total_paths),
            backtest=_backtest(holdout, total_actual, total_predicted, total_naive),
        )


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"
