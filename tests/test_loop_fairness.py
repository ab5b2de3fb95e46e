"""Work a client can cause in bulk lets the event loop run other work as it goes.

A session may hold a thousand stored events of 256 KiB (``buffer_size`` x
``max_body_size``). Reading its snapshot, or replaying it to a new subscriber, in one
step held the loop for seconds: every other stream, heartbeat and request waited. Each
test runs the work beside a task that counts the turns of the loop it gets: a step that
never yields leaves it at 0, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from server.brokers.memory import MemoryBroker
from server.hub import Frame, Hub
from server.messages import CompleteEvent, ProgressEvent, StoredEvent
from server.metrics import Metrics
from server.snapshot import session_snapshot
from server.transports.pump import Outlet, pump

SESSION = "fairness-0001"
LARGE = 256 * 1024  # the largest body a publisher may send (max_body_size)
EVENTS = 16  # 4 MiB in all


class Turns:
    """Counts the turns of the event loop it is given while some work runs."""

    def __init__(self) -> None:
        self.count = 0
        self._task = asyncio.create_task(self._count())

    async def _count(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.count += 1

    def stop(self) -> int:
        self._task.cancel()
        return self.count


def large_progress(n: int) -> ProgressEvent:
    return ProgressEvent(
        session_id=SESSION,
        agent="crawler",
        status=f"page {n}",
        progress=n,
        data={"page": "x" * LARGE},
    )


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    hub = Hub(MemoryBroker(100, 60.0), queue_size=100, metrics=Metrics())
    await hub.start()
    yield hub
    await hub.close()


async def stored_story(hub: Hub) -> list[StoredEvent]:
    for n in range(1, EVENTS + 1):
        await hub.publish(large_progress(n))
    await hub.publish(CompleteEvent(session_id=SESSION, agent="crawler", final=True))
    replay = await hub.broker.read(SESSION, None)
    return replay.events


async def test_a_snapshot_of_large_events_lets_the_loop_turn(hub: Hub) -> None:
    """GET /api/sessions/{id} folds every stored event: 4 MiB of them let the loop turn
    along the way, and the snapshot is the same."""
    events = await stored_story(hub)
    info = await hub.broker.info(SESSION)
    assert info is not None
    turns = Turns()
    snapshot = await session_snapshot(SESSION, info, events)
    assert turns.stop() >= 3  # about one turn per MiB read
    assert snapshot["state"] == "complete" and snapshot["last_seq"] == EVENTS + 1
    assert snapshot["agents"]["crawler"]["state"] == "complete"


async def test_a_replay_of_large_events_lets_the_loop_turn(hub: Hub) -> None:
    """A new subscriber's replay is sent by its connection's task: 4 MiB to a socket that
    takes them at once (the first replay also builds each frame) let the loop turn along
    the way, and every event goes out once, in order."""
    await stored_story(hub)
    sent: list[Frame] = []

    async def send(frame: Frame) -> None:
        sent.append(frame)  # a socket that takes everything at once: no wait

    async with hub.subscribe(SESSION) as subscription:
        outlet = Outlet(
            subscription,
            _OpenSocket(),  # type: ignore[arg-type]
            Metrics(),
            "websocket",
            30.0,
            prebuilt=None,
            send=send,
        )
        turns = Turns()
        assert await pump(outlet) is True  # to the final event
        assert turns.stop() >= 3
    assert [f.seq for f in sent if isinstance(f, StoredEvent)] == list(range(1, EVENTS + 2))


class _OpenSocket:
    """The one thing the pump asks of a socket that takes every frame at once."""

    is_closing: Callable[[], bool] = staticmethod(lambda: False)
