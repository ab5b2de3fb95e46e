"""The numerical core of the demand forecast: pure functions, run in worker processes.

:func:`fit_product` is what the demand agent sends to its process pool, once
per product: it takes a product's weekly *baseline* units (its sales with the
price and promotion effects taken out, see ``demand.py``) and returns

* the point forecast of the next ``horizon`` weeks and ``repetitions``
  simulated future paths (for the prediction intervals);
* the backtest: the same model fitted without the last ``holdout`` weeks and
  its forecast of them, and the seasonal-naive forecast of them.

The model is Holt-Winters exponential smoothing (statsmodels'
``ExponentialSmoothing``) with an additive damped trend and an additive
52-week seasonality, fitted to ``log(1 + units)``: on the log scale the
seasonal swing grows with the level, as it does in retail, and the forecast
can never go negative. The simulated paths come from the fitted model
(``simulate`` with normal errors of the residual variance). If the fit fails
or gives non-finite numbers, the seasonal-naive model takes over: each week is
forecast by the same week a year earlier, with normal errors of the variance
of the year-on-year differences.

Everything here is deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Method = Literal["holt_winters", "seasonal_naive"]
SEASON = 52


@dataclass(frozen=True, slots=True)
class FitJob:
    key: str  # the product id, to tell the outcomes apart
    baseline: FloatArray  # weekly baseline units, the whole history
    train_baseline: FloatArray  # the same without the holdout (with its own effects)
    horizon: int
    holdout: int
    repetitions: int
    seed: int


@dataclass(frozen=True, slots=True)
class FitOutcome:
    key: str
    method: Method
    point: FloatArray  # horizon, baseline units (the median forecast)
    paths: npt.NDArray[np.float32]  # repetitions x horizon, baseline units
    backtest: FloatArray  # holdout, baseline units, same method as ``point``
    naive_backtest: FloatArray  # holdout, baseline units, seasonal naive
    notes: tuple[str, ...] = field(default=())
    pid: int = 0  # the process that fitted it


class _FitError(Exception):
    """The model could not be fitted, or gave numbers that are not finite."""


def _holt_winters(
    y: FloatArray, horizon: int, repetitions: int = 0, rng: np.random.Generator | None = None
) -> tuple[FloatArray, FloatArray | None, list[str]]:
    """Fit Holt-Winters to the log series ``y``: forecast ``horizon`` steps (log scale), and
    simulate ``repetitions`` future paths (``repetitions x horizon``) if asked."""
    from statsmodels.tools.sm_exceptions import (  # type: ignore[import-untyped]
        ConvergenceWarning,
    )
    from statsmodels.tsa.holtwinters import (  # type: ignore[import-untyped]
        ExponentialSmoothing,
    )

    if len(y) < 2 * SEASON:
        raise _FitError(f"{len(y)} weeks of history, Holt-Winters needs {2 * SEASON}")
    notes: list[str] = []
    paths: FloatArray | None = None
    with warnings.catch_warnings(record=True) as caught:
        # Recorded here, then a non-converged optimizer becomes a note and anything else is
        # raised again as a warning outside this block.
        warnings.simplefilter("always")
        fitted = ExponentialSmoothing(
            y,
            trend="add",
            damped_trend=True,
            seasonal="add",
            seasonal_periods=SEASON,
            initialization_method="heuristic",
        ).fit(use_brute=False)  # the grid search of start values costs 2.5x, gains nothing here
        forecast = np.asarray(fitted.forecast(horizon), dtype=np.float64)
        if repetitions:
            simulated = fitted.simulate(
                horizon, anchor="end", repetitions=repetitions, error="add", rng=rng
            )
            paths = np.asarray(simulated, dtype=np.float64).reshape(horizon, repetitions).T
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            notes.append("the Holt-Winters optimizer did not fully converge")
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    if not np.all(np.isfinite(forecast)) or (paths is not None and not np.all(np.isfinite(paths))):
        raise _FitError("non-finite forecast")
    return forecast, paths, notes


def seasonal_naive(y: FloatArray, horizon: int) -> FloatArray:
    """Each future week is the same week a year earlier (the mean if less than a year)."""
    if len(y) < SEASON:
        return np.full(horizon, float(np.mean(y)) if len(y) else 0.0)
    last_year = y[-SEASON:]
    return np.array([last_year[h % SEASON] for h in range(horizon)], dtype=np.float64)


def _naive_paths(
    y: FloatArray, point: FloatArray, repetitions: int, rng: np.random.Generator
) -> FloatArray:
    if len(y) > SEASON + 1:
        sigma = float(np.std(y[SEASON:] - y[:-SEASON], ddof=1))
    elif len(y) > 1:
        sigma = float(np.std(y, ddof=1))
    else:
        sigma = 0.0
    return point[None, :] + rng.normal(0.0, sigma, size=(repetitions, len(point)))


def _to_units(log_values: FloatArray) -> FloatArray:
    return np.maximum(np.expm1(log_values), 0.0)


def fit_product(job: FitJob) -> FitOutcome:
    """Forecast one product (runs in a worker process; see the module docstring)."""
    rng = np.random.default_rng(job.seed)
    y = np.log1p(np.maximum(job.baseline, 0.0))
    train = np.log1p(np.maximum(job.train_baseline, 0.0))
    notes: list[str] = []
    method: Method = "holt_winters"
    try:
        point, simulated, fit_notes = _holt_winters(y, job.horizon, job.repetitions, rng)
        assert simulated is not None
        paths = simulated
        backtest, _, backtest_notes = _holt_winters(train, job.holdout)
        notes.extend(dict.fromkeys(fit_notes + backtest_notes))
    except Exception as exc:  # any failure of the model falls back to the baseline model
        method = "seasonal_naive"
        notes.append(f"Holt-Winters failed ({type(exc).__name__}); used the seasonal naive model")
        point = seasonal_naive(y, job.horizon)
        paths = _naive_paths(y, point, job.repetitions, rng)
        backtest = seasonal_naive(train, job.holdout)
    return FitOutcome(
        key=job.key,
        method=method,
        point=_to_units(point),
        paths=_to_units(paths).astype(np.float32),
        backtest=_to_units(backtest),
        naive_backtest=_to_units(seasonal_naive(train, job.holdout)),
        notes=tuple(notes),
        pid=os.getpid(),
    )


def mape(actual: FloatArray, predicted: FloatArray) -> float | None:
    """Mean absolute percentage error in percent, over the weeks with non-zero actuals."""
    actual = np.asarray(actual, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    mask = actual != 0
    if not mask.any():
        return None
    return float(np.mean(np.abs(actual[mask] - predicted[mask]) / np.abs(actual[mask])) * 100.0)


def rmse(actual: FloatArray, predicted: FloatArray) -> float:
    """Root mean squared error, in the units of the series."""
    diff = np.asarray(actual, dtype=np.float64) - np.asarray(predicted, dtype=np.float64)
    return float(math.sqrt(float(np.mean(diff**2)))) if diff.size else 0.0


def init_worker() -> None:
    """Run once in each worker process: yield the CPU to the event loop's process first."""
    try:
        os.nice(5)
    except (AttributeError, OSError):  # not on this platform, or not allowed: run as is
        pass
