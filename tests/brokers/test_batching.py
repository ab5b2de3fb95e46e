"""The Batcher that pipelines the Redis broker's appends: a lone call goes out at once,
calls made while others are on their way share one batch per turn of the loop, and every
caller gets its own answer, or its own error, whatever happens to the others.

``send`` here is a gate the test opens, so that what is "on its way" is under the test's
control; the Redis broker's use of it is tested against a real Redis beside this file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from server.brokers.batching import Batcher

from .redis_support import TIMEOUT


class Closed(Exception):
    pass


class Refused(Exception):
    pass


class GatedSend:
    """Records each batch and answers it once the test opens the gate: ``-n`` for an item
    ``n``, an exception for a negative item; the whole batch fails if it holds 13."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.arrived = asyncio.Condition()

    async def __call__(self, items: list[int]) -> Sequence[int | Exception]:
        async with self.arrived:
            self.batches.append(items)
            self.arrived.notify_all()
        await self.gate.wait()
        if 13 in items:
            raise Refused("the whole batch")
        return [Refused(f"item {n}") if n < 0 else -n for n in items]

    async def wait_for_batches(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT), self.arrived:
            await self.arrived.wait_for(lambda: len(self.batches) >= count)


def batcher(send: GatedSend, max_batch: int = 64) -> Batcher[int, int]:
    return Batcher(send, max_batch=max_batch, closed=lambda: Closed("closed"))


def calls(batch: Batcher[int, int], items: range | list[int]) -> list[asyncio.Task[int]]:
    return [asyncio.create_task(batch.submit(n)) for n in items]


async def test_a_lone_call_goes_at_once_and_the_next_ones_together() -> None:
    send = GatedSend()
    pipeline = batcher(send)
    first = calls(pipeline, [1])
    await send.wait_for_batches(1)
    rest = calls(pipeline, range(2, 12))  # made while the first is on its way
    await send.wait_for_batches(2)
    send.gate.set()
    assert await asyncio.gather(*first, *rest) == [-n for n in range(1, 12)]
    assert send.batches == [[1], list(range(2, 12))]
    assert pipeline.batches == 2


async def test_a_batch_does_not_wait_for_the_one_before_it() -> None:
    """Calls of a later turn go out while an earlier batch is still unanswered, and a turn
    with more than ``max_batch`` calls is split into batches that go out side by side."""
    send = GatedSend()
    pipeline = batcher(send, max_batch=4)
    calls(pipeline, [1])
    await send.wait_for_batches(1)
    waiting = calls(pipeline, range(2, 12))
    await send.wait_for_batches(4)  # 4 + 4 + 2, none answered yet
    assert send.batches == [[1], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    send.gate.set()
    assert await asyncio.gather(*waiting) == [-n for n in range(2, 12)]


async def test_each_caller_gets_its_own_error() -> None:
    """An item's error reaches its caller only; a failed batch fails its own callers, not
    those of the batch beside it."""
    send = GatedSend()
    pipeline = batcher(send, max_batch=3)
    calls(pipeline, [1])
    await send.wait_for_batches(1)
    good = calls(pipeline, [2, -3, 4])
    doomed = calls(pipeline, [13, 5])
    await send.wait_for_batches(3)
    send.gate.set()
    results = await asyncio.gather(*good, *doomed, return_exceptions=True)
    assert results[0] == -2 and results[2] == -4
    assert isinstance(results[1], Refused) and str(results[1]) == "item -3"
    assert all(isinstance(r, Refused) and str(r) == "the whole batch" for r in results[3:])


async def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    send = GatedSend()
    pipeline = batcher(send)
    calls(pipeline, [1])
    await send.wait_for_batches(1)
    leaving, staying = calls(pipeline, [2, 3])
    await send.wait_for_batches(2)
    leaving.cancel()
    send.gate.set()
    assert await staying == -3
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_close_fails_what_is_waiting_and_refuses_new_calls() -> None:
    send = GatedSend()
    pipeline = batcher(send)
    calls(pipeline, [1])
    await send.wait_for_batches(1)
    in_flight = calls(pipeline, [2, 3])
    await send.wait_for_batches(2)
    not_sent = calls(pipeline, [4])
    await asyncio.sleep(0)  # let the call be made; its batch task has not run yet
    await pipeline.close()
    for task in [*in_flight, *not_sent]:
        with pytest.raises(Closed):
            await task
    with pytest.raises(Closed):
        await pipeline.submit(5)


def test_a_batch_holds_at_least_one_call() -> None:
    with pytest.raises(ValueError):
        Batcher(GatedSend(), max_batch=0, closed=lambda: Closed())
