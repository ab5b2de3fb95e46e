"""Autopipelining: calls submitted in one turn of the event loop go out as one batch.

Each publish request, and each workflow, awaits one append at a time, but many of them
run at once: under load, dozens of appends are submitted in the same turn of the event
loop. Sent one by one, each costs a write and a read, here and in Redis. Sent together
as one pipeline, the whole batch costs one of each.

Nothing waits for a timer. A call made while nothing else is on its way goes out at
once; the calls made while one is on its way go out together on the next turn of the
loop, without waiting for its answer. So a lone call pays nothing, and under load each
turn of the loop costs one round trip, however many calls it made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

# What a batch answers: one result, or one exception, per call, in the order of the calls.
SendBatch = Callable[[list[In]], Awaitable[Sequence[Out | Exception]]]


class Batcher(Generic[In, Out]):
    """Send a call at once when nothing else is on its way; otherwise collect the calls of
    one loop turn and hand each batch of at most ``max_batch`` to ``send``, in a task of
    its own, so that batches of later turns need not wait for it.

    ``closed`` makes the exception that calls still pending get when the batcher closes.
    """

    def __init__(
        self,
        send: SendBatch[In, Out],
        *,
        max_batch: int,
        closed: Callable[[], Exception],
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._send = send
        self._max_batch = max_batch
        self._closed_error = closed
        # Calls waiting for their batch. Whenever it is not empty, a batch task has been
        # started that will take them when it runs.
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # batches sent and not answered yet
        self._closed = False
        self.batches = 0  # batches sent so far, lone calls included (for tests)

    async def submit(self, item: In) -> Out:
        if self._closed:
            raise self._closed_error()
        if not self._in_flight and not self._pending:
            # Nothing else on its way: the call goes out now, from the caller's own task,
            # a turn of the loop sooner than through a batch task.
            return await self._send_alone(item)
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        if not self._pending:
            # The task starts on the next turn of the loop and takes what is pending then.
            self._start(self._send_pending())
        self._pending.append((item, future))
        return await future

    async def _send_alone(self, item: In) -> Out:
        self.batches += 1
        self._in_flight += 1
        try:
            (result,) = await self._send([item])
        finally:
            self._in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    def _start(self, batch: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(batch)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_pending(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        if self._pending:  # more than one batch's worth: the rest goes beside this one
            self._start(self._send_pending())
        self.batches += 1
        self._in_flight += 1
        try:
            results = await self._send([item for item, _ in batch])
        except asyncio.CancelledError:
            _fail(batch, self._closed_error())
            raise
        except Exception as error:
            _fail(batch, error)
            return
        finally:
            self._in_flight -= 1
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        """Fail the calls not sent yet, and cancel the batches in flight."""
        self._closed = True
        pending, self._pending = self._pending, []
        _fail(pending, self._closed_error())
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _fail(batch: Sequence[tuple[In, asyncio.Future[Out]]], error: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
