"""The process pool the demand agent's fits run in: other processes, one pool, and
nothing left running after close()."""

from __future__ import annotations

import asyncio
import multiprocessing
import os

import pytest

from server.agents.fit_pool import ForecastExecutor
from server.agents.forecasting import FitJob
from server.agents.history import load_history


def small_jobs(count: int) -> list[FitJob]:
    """``count`` quick fits of the first product (4 weeks ahead, 100 simulated paths)."""
    y = load_history().products[0].units("all")
    return [FitJob(str(i), y, y[:-8], 4, 8, 100, i) for i in range(count)]


async def test_a_closed_executor_refuses_work() -> None:
    """After close() the executor takes no more fits (and closing twice is harmless)."""
    executor = ForecastExecutor(max_workers=1)
    await executor.close()
    await executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        await executor.fit(small_jobs(1)[0])


async def test_fits_run_in_worker_processes(forecast_executor: ForecastExecutor) -> None:
    """The executor fits in other processes than the event loop's, at most max_workers."""
    outcomes = await asyncio.gather(*(forecast_executor.fit(job) for job in small_jobs(4)))
    pids = {outcome.pid for outcome in outcomes}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= forecast_executor.max_workers


async def test_fits_arriving_at_once_share_one_pool_and_close_stops_its_workers() -> None:
    """A fresh executor given many fits at once (a forecast's products) starts one pool, in
    a thread, with its workers, and every fit runs there; close() leaves no worker
    process behind."""
    before = set(multiprocessing.active_children())
    executor = ForecastExecutor(max_workers=2)
    try:
        outcomes = await asyncio.gather(*(executor.fit(job) for job in small_jobs(6)))
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == executor.max_workers  # one pool's worth, not one per fit
        assert {outcome.pid for outcome in outcomes} <= {worker.pid for worker in workers}
    finally:
        await executor.close()
    assert set(multiprocessing.active_children()) <= before


async def test_closing_while_the_pool_starts_leaves_no_worker() -> None:
    """A shutdown that comes while the first fits are starting the pool (in a thread) ends
    those fits (refused, or cancelled as queued fits are at shutdown), not a hang, and
    leaves no worker process behind."""
    before = set(multiprocessing.active_children())
    executor = ForecastExecutor(max_workers=2)
    fits = [asyncio.ensure_future(executor.fit(job)) for job in small_jobs(4)]
    await asyncio.sleep(0)  # one turn of the loop: the fits ask for the pool
    await executor.close()
    outcomes = await asyncio.gather(*fits, return_exceptions=True)
    assert all(isinstance(outcome, BaseException) for outcome in outcomes), outcomes
    assert set(multiprocessing.active_children()) <= before
