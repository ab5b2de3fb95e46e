"""The demand agent: real forecasts of the shipped history, the scenario applied, the loop free."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from server.agents.demand import INTERVAL_LEVEL, DemandAgent, DemandForecast, holdout_weeks
from server.agents.fit_pool import ForecastExecutor
from server.agents.history import load_history
from server.agents.parameters import ForecastParameters
from tests.agents.conftest import Recorder

HEATING_4 = ForecastParameters(product_category="heating", horizon_weeks=4)
MAX_LOOP_GAP = 0.25  # seconds: generous for a loaded CI machine


_cache: dict[ForecastParameters, DemandForecast] = {}


async def forecast(
    executor: ForecastExecutor, params: ForecastParameters, recorder: Recorder | None = None
) -> DemandForecast:
    """The agent's forecast; without a recorder, the first result for these parameters (the
    forecast is deterministic, so tests that only read results share one run)."""
    if recorder is not None:
        return await DemandAgent(executor)(params, recorder)
    if params not in _cache:
        _cache[params] = await DemandAgent(executor)(params, Recorder())
    return _cache[params]


async def test_forecast_is_sane_against_the_history(forecast_executor: ForecastExecutor) -> None:
    """Each product's 4-week forecast is within -30 %/+60 % of the same weeks a year earlier,
    the history tail is the shipped data, and the total adds the products up."""
    result = await forecast(forecast_executor, HEATING_4)
    history = load_history()
    products = history.select("heating")

    assert [p.product.product_id for p in result.products] == [p.info.product_id for p in products]
    assert result.forecast_weeks[0] == history.weeks[-1] + (history.weeks[1] - history.weeks[0])
    assert len(result.forecast_weeks) == 4 and len(result.history_weeks) == 52
    for item, source in zip(result.products, products, strict=True):
        units = source.units("all")
        assert item.series.history == units[-52:].tolist()
        # the forecast starts 156 weeks after the first week: a year earlier is week 104
        last_year = units[104:108].sum()
        assert 0.7 * last_year < item.series.total_units < 1.6 * last_year, item.product.name
        assert item.method == "holt_winters"
        assert item.scenario_factor == 1.0 and item.scenario_price == item.product.list_price
    assert result.total.total_units == pytest.approx(
        sum(p.series.total_units for p in result.products), abs=0.5
    )
    assert result.total.history == pytest.approx(
        np.sum([p.units("all")[-52:] for p in products], axis=0).tolist()
    )


async def test_intervals_contain_the_point_forecast(forecast_executor: ForecastExecutor) -> None:
    """Every week's and every total's interval holds its point forecast, and is not negative."""
    result = await forecast(forecast_executor, HEATING_4)
    assert result.interval_level == INTERVAL_LEVEL
    for series in [p.series for p in result.products] + [result.total]:
        assert len(series.forecast) == len(series.lower) == len(series.upper) == 4
        for low, point, high in zip(series.lower, series.forecast, series.upper, strict=True):
            assert 0 <= low <= point <= high
            assert high > low
        assert series.total_lower <= series.total_units <= series.total_upper


async def test_progress_is_reported_per_product_with_real_numbers(
    forecast_executor: ForecastExecutor, recorder: Recorder
) -> None:
    """One 'Forecasting i/3 <category> · <product>: <units> units over 4 weeks' per product,
    with rising progress and the same numbers as the result."""
    result = await forecast(forecast_executor, HEATING_4, recorder)
    per_product = [r for r in recorder.reports if r.status.startswith("Forecasting ")]
    assert len(per_product) == 3
    assert [r.data["done"] for r in per_product] == [1, 2, 3]
    progress = [r.progress for r in recorder.reports]
    assert progress == sorted(progress)
    by_name = {p.product.name: p for p in result.products}
    for index, report in enumerate(per_product, start=1):
        item = by_name[report.data["product"]]
        units = round(item.series.total_units)
        assert report.status.startswith(
            f"Forecasting {index}/3 Outdoor heating · {item.product.name}: {units:,} units "
            "over 4 weeks (backtest MAPE "
        )
        assert report.data["units"] == units
    assert recorder.statuses[-1].startswith(
        f"Forecast ready: {round(result.total.total_units):,} units over 4 weeks"
    )


async def test_price_cut_and_promotion_raise_units_by_elasticity_and_uplift(
    forecast_executor: ForecastExecutor,
) -> None:
    """10 % off multiplies each product by 0.9 ** elasticity; a promotion by 1 + uplift."""
    base = await forecast(forecast_executor, HEATING_4)
    cut = await forecast(forecast_executor, HEATING_4.model_copy(update={"price_change_pct": -10}))
    promo = await forecast(forecast_executor, HEATING_4.model_copy(update={"promotion": True}))
    for plain, cheaper, promoted in zip(base.products, cut.products, promo.products, strict=True):
        elasticity = plain.elasticity
        assert elasticity < -1
        expected = 0.9**elasticity
        assert expected > 1
        assert cheaper.series.total_units / plain.series.total_units == pytest.approx(
            expected, rel=1e-3
        )
        assert cheaper.scenario_price == round(plain.product.list_price * 0.9, 2)
        assert promoted.series.total_units / plain.series.total_units == pytest.approx(
            1 + plain.promotion_uplift, rel=1e-3
        )
    assert cut.total.total_units > base.total.total_units


async def test_backtest_on_the_holdout(forecast_executor: ForecastExecutor) -> None:
    """The backtest covers holdout_weeks(horizon) weeks, per product and in total, with the
    seasonal-naive MAPE next to the model's."""
    result = await forecast(forecast_executor, HEATING_4)
    assert holdout_weeks(4) == 8 and holdout_weeks(20) == 20 and holdout_weeks(52) == 26
    for backtest in [p.backtest for p in result.products] + [result.backtest]:
        assert backtest.holdout_weeks == 8
        assert backtest.mape is not None and 0 < backtest.mape < 30
        assert backtest.naive_mape is not None and backtest.naive_mape > 0
        assert backtest.rmse > 0
    summary = result.summary()
    assert summary["backtest_mape"] == result.backtest.mape
    assert summary["total_units"] == round(result.total.total_units)


async def test_channel_selects_its_units(forecast_executor: ForecastExecutor) -> None:
    """An online-only forecast uses the online history, a fraction of both channels'."""
    both = await forecast(forecast_executor, HEATING_4)
    online = await forecast(forecast_executor, HEATING_4.model_copy(update={"channel": "online"}))
    source = load_history().select("heating")[0]
    assert online.products[0].series.history == source.online[-52:].tolist()
    assert 0.1 * both.total.total_units < online.total.total_units < 0.7 * both.total.total_units


async def test_the_event_loop_keeps_ticking_while_models_are_fitted(
    forecast_executor: ForecastExecutor,
) -> None:
    """While 5 products are fitted (in worker processes) a 10 ms ticker is never held up for
    MAX_LOOP_GAP: statsmodels holds the GIL, so this only holds off the loop's thread."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    params = ForecastParameters(product_category="outdoor_furniture", horizon_weeks=26)
    started = time.perf_counter()
    result = await forecast(forecast_executor, params)
    elapsed = time.perf_counter() - started
    done.set()
    await ticking

    assert len(result.products) == 5
    assert len(gaps) > 5
    assert max(gaps) < MAX_LOOP_GAP, f"loop stalled {max(gaps):.3f}s during a {elapsed:.2f}s run"


async def test_concurrent_first_runs_read_the_history_one_thread_at_a_time(
    forecast_executor: ForecastExecutor,
) -> None:
    """The first workflows after a start all need the history before it is cached: they
    read it one thread at a time, not side by side (threads parsing at once kept the
    event loop waiting for the GIL)."""
    inside = most = 0
    count = threading.Lock()

    def slow_load() -> Any:
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)  # a parse that takes a while (the CSVs, cold)
        with count:
            inside -= 1
        raise RuntimeError("stop here: only the reading is under test")

    agent = DemandAgent(forecast_executor, load=slow_load)
    recorder = Recorder()
    runs = [agent(ForecastParameters(), recorder) for _ in range(5)]
    outcomes = await asyncio.gather(*runs, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert most == 1
