"""The numerical core, called directly: MAPE, RMSE, seasonal naive, Holt-Winters and fallback."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.agents.forecasting import FitJob, fit_product, mape, rmse, seasonal_naive


def test_mape_by_hand() -> None:
    """|100-110|/100, |200-180|/200, |50-50|/50 -> 10 %, 10 %, 0 %: 6.67 %; zero weeks skipped."""
    actual = np.array([100.0, 200.0, 0.0, 50.0])
    predicted = np.array([110.0, 180.0, 5.0, 50.0])
    assert mape(actual, predicted) == pytest.approx(20 / 3)
    assert mape(np.zeros(3), np.ones(3)) is None


def test_rmse_by_hand() -> None:
    """Errors 0, 0, 2 -> sqrt(4 / 3)."""
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(
        math.sqrt(4 / 3)
    )


def test_seasonal_naive_repeats_last_year() -> None:
    """Week h ahead is the week 52 - h before the end, wrapping after a year."""
    y = np.arange(104, dtype=np.float64)
    assert seasonal_naive(y, 3).tolist() == [52.0, 53.0, 54.0]
    assert seasonal_naive(y, 54)[52:].tolist() == [52.0, 53.0]
    assert seasonal_naive(np.array([2.0, 4.0]), 2).tolist() == [3.0, 3.0]


def synthetic(weeks: int, seed: int = 7) -> np.ndarray:
    """Level 200 growing 5 %/year, a yearly swing of +-40 %, 5 % noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(weeks)
    season = 1 + 0.4 * np.sin(2 * np.pi * t / 52)
    return 200 * 1.05 ** (t / 52) * season * np.exp(rng.normal(0, 0.05, weeks))


def test_holt_winters_forecasts_a_clean_series() -> None:
    """On a known series the forecast follows the truth within 10 %, inside its interval."""
    y = synthetic(156 + 8)
    history, future = y[:156], y[156:]
    truth = (
        200
        * 1.05 ** (np.arange(156, 164) / 52)
        * (1 + 0.4 * np.sin(2 * np.pi * np.arange(156, 164) / 52))
    )
    job = FitJob("x", history, history[:-8], horizon=8, holdout=8, repetitions=500, seed=1)
    outcome = fit_product(job)

    assert outcome.method == "holt_winters"
    assert outcome.point.shape == (8,) and outcome.paths.shape == (500, 8)
    assert np.all(np.abs(outcome.point / truth - 1) < 0.10)
    lower, upper = np.quantile(outcome.paths, [0.05, 0.95], axis=0)
    assert np.all(lower <= outcome.point) and np.all(outcome.point <= upper)
    assert mape(future, outcome.point) is not None
    assert mape(history[-8:], outcome.backtest) < 10  # type: ignore[operator]
    again = fit_product(job)
    assert np.array_equal(again.paths, outcome.paths)  # deterministic for a seed


def test_too_short_a_history_falls_back_to_seasonal_naive() -> None:
    """60 weeks cannot fit yearly Holt-Winters: seasonal naive, with a note saying so."""
    y = synthetic(60)
    outcome = fit_product(FitJob("x", y, y[:-8], horizon=4, holdout=8, repetitions=200, seed=1))
    assert outcome.method == "seasonal_naive"
    assert outcome.notes and "seasonal naive" in outcome.notes[0]
    assert outcome.point == pytest.approx(y[8:12], rel=1e-9)
    assert np.all(outcome.paths >= 0)
