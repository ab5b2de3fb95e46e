"""Where the demand agent's model fits run: a pool of worker processes.

Fitting is mostly Python code holding the GIL, so in a thread it would take turns
with the event loop for the one interpreter, and several sessions forecasting at once
would slow every stream's events and heartbeats. In worker processes the fits use
every core and the loop's interpreter stays free.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from typing import cast

from .forecasting import FitJob, FitOutcome, fit_product, init_worker


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus)


log = logging.getLogger(__name__)

# How long close() lets running fits finish before it stops their worker processes.
_STOP_WAIT = 0.5
# How long a stopped worker, or the pool's result thread, gets to end before more force.
_KILL_WAIT = 2.0


def _stop_workers(workers: Sequence[BaseProcess]) -> None:
    """Stop the workers still alive and reap them: SIGTERM, then SIGKILL, each wait
    bounded. Blocks: run it in a thread.

    The pool stops its workers itself when one dies, but on Python 3.11 its result
    thread crashes first if a fit it would fail was cancelled meanwhile (CPython
    gh-107219; the demand agent cancels its queued fits whenever it is stopped), and the
    others then wait for work for ever, and the interpreter's exit with them."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(_KILL_WAIT)
        if worker.is_alive():
            worker.kill()
            worker.join(_KILL_WAIT)


class ForecastExecutor:
    """A process pool for model fits, created on first use and shut down by :meth:`close`.

    Workers are started with ``spawn`` (no ``fork`` of a process running an event loop and
    threads) and lower their own priority, so the event loop wins the CPU when both want it.
    The pool is created, and its workers started, in a thread: in the event loop that held
    every stream for 12 to 23 ms at the first forecast (pipes, semaphores, fork and exec;
    docs/BENCHMARKS.md).
    """

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or default_workers()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        # Held while the pool is created or taken away, by a thread or the loop.
        self._lock = threading.Lock()

    def _start_pool(self) -> ProcessPoolExecutor:
        """The pool, created with its workers running if there is none. Runs in a thread;
        it keeps the pool itself, so a caller cancelled meanwhile loses nothing."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the forecast executor is closed")
            if self._pool is None:
                pool = ProcessPoolExecutor(
                    max_workers=self.max_workers,
                    mp_context=get_context("spawn"),
                    initializer=init_worker,
                )
                try:
                    # With "spawn" a submit starts a worker when none is idle: start them all.
                    for _ in range(self.max_workers):
                        pool.submit(os.getpid)
                except BaseException:  # a worker could not be started (out of processes...)
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                self._pool = pool
            return self._pool

    async def fit(self, job: FitJob) -> FitOutcome:
        pool = self._pool
        if pool is None:
            pool = await asyncio.to_thread(self._start_pool)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fit_product, job)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): start a new pool next time.
            if self._pool is pool:
                self._pool = None
                workers = list((pool._processes or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                await asyncio.to_thread(_stop_workers, workers)
            raise

    async def close(self) -> None:
        """Cancel queued fits, give running ones ``_STOP_WAIT``, then stop the workers.

        ``close`` comes at shutdown, once the workflows have had their grace period and
        were interrupted: nothing waits for a running fit's result any more, and a fit can
        take longer than the few seconds a shutdown has.
        """
        with self._lock:  # waits while a pool is being started: tens of ms, at shutdown
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        # No public way to stop busy workers before Python 3.14 (terminate_workers()).
        workers = list((pool._processes or {}).values())
        # The thread that reads the workers' results (started by _start_pool's first
        # submit; typeshed calls it a _ThreadWakeup). Interpreter exit waits for it.
        manager = cast(threading.Thread, pool._executor_manager_thread)
        results = pool._result_queue
        # Not waiting, shutdown() leaves the result queue open: it is closed below, here
        # only, once the manager thread is done with it.
        pool.shutdown(wait=False, cancel_futures=True)
        # The short wait lets the pool's manager thread cancel the queued fits first: on
        # Python 3.11 it crashes if a worker dies while a cancelled fit is still queued.
        await asyncio.to_thread(manager.join, _STOP_WAIT)
        # Every worker still busy, and any the result thread left (see _stop_workers).
        await asyncio.to_thread(_stop_workers, workers)
        if manager.is_alive():
            # A worker stopped while it sends its result would leave the manager thread
            # reading the rest for ever (it reads a result's length, then its bytes; past
            # 16 KiB, or into a full pipe, a worker writes them in several writes): the
            # pipe has no end of file while this process holds a write end too, and a
            # stuck manager thread hangs the interpreter's exit. Close that end (nothing
            # here writes to it): once the workers are gone, the manager thread reads
            # end of file, fails what was left (the pool is broken) and ends.
            results._writer.close()  # type: ignore[attr-defined]
            await asyncio.to_thread(manager.join, _KILL_WAIT)
        if manager.is_alive():
            log.error("the forecast pool's result thread did not end")
            return  # its queue stays open: the thread may still read it
        results.close()
