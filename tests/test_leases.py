"""Workflow leases in the runner and the monitor (server/leases.py), with two apps in this
process standing for two server processes on one Redis: a running workflow keeps its
lease; one whose process stops renewing it is ended elsewhere with
``workflow_interrupted``; sessions without a workflow are left alone; racing monitors
store one final event; a session the store lost under a running workflow is ended once
its grace has passed; and on the in-memory broker nothing is ever taken for lost.

The real thing, a ``python -m server`` killed with SIGKILL, is in tests/multiprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import pytest
from aiohttp.test_utils import BaseTestServer
from redis.asyncio import Redis

from server.api import WORKFLOW_RUNNER
from server.app import create_app
from server.brokers.base import IdempotencyKey, Lease, LeaseState
from server.brokers.memory import MemoryBroker
from server.brokers.redis import RedisBroker
from server.config import Settings
from server.errors import Conflict, ServiceUnavailable
from server.hub import Hub, Subscription
from server.leases import QUIET_ROUNDS, WorkflowLeases
from server.messages import CompleteEvent, ControlEvent, ProgressEvent, StoredEvent
from server.metrics import Metrics
from server.workflow import WorkflowRunner
from tests.clients import app_of, new_session_id
from tests.conftest import hub_of
from tests.hardening.support import FakeAgents
from tests.timing import EVENT_TIMEOUT, POLL_INTERVAL

LEASE_TTL = 0.3  # seconds: short, so that a lapsed lease shows within a test
QUIET = 3600.0  # a lease check interval that never comes round: the test calls check()

Start = Callable[..., Awaitable[BaseTestServer]]


@pytest.fixture
async def start(
    aiohttp_server: Callable[..., Awaitable[BaseTestServer]], settings: Settings
) -> Start:
    """Start an app ("process") on the test's broker; every app of a test shares it."""

    async def factory(agents: FakeAgents | None = None, **changes: Any) -> BaseTestServer:
        changes = {"lease_ttl": LEASE_TTL, "lease_check_interval": QUIET, **changes}
        app = create_app(settings.replace(**changes), agents=agents or FakeAgents())
        return await aiohttp_server(app)

    return factory


@pytest.fixture
async def gated() -> AsyncIterator[FakeAgents]:
    """Fake agents whose demand agent waits until the test opens the gate."""
    agents = FakeAgents()
    agents.gate = asyncio.Event()
    yield agents
    agents.gate.set()


def runner_of(server: BaseTestServer) -> WorkflowRunner:
    return app_of(server)[WORKFLOW_RUNNER]


def payload(frame: StoredEvent | ControlEvent) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(frame.payload)
    return event


async def until_final(sub: Subscription, timeout: float = EVENT_TIMEOUT) -> list[dict[str, Any]]:
    """Every frame up to the final event (``timeout`` for the whole wait)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not sub.finished:
            frame = await sub.get(timeout)
            if frame is not None:
                frames.append(payload(frame))
    return frames


async def demand_started(sub: Subscription) -> None:
    async with asyncio.timeout(EVENT_TIMEOUT):
        while True:
            frame = await sub.get(EVENT_TIMEOUT)
            if frame is not None and payload(frame).get("agent") == "demand":
                return


def is_interrupted_by_a_monitor(event: dict[str, Any]) -> bool:
    return (
        event["type"] == "error"
        and event["code"] == "workflow_interrupted"
        and event["agent"] == "orchestrator"
        and event["final"] is True
        and event["details"] == ""
        and "id" in event
    )


# --- on Redis ----------------------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_a_running_workflow_keeps_its_lease_and_releases_it_after_the_final_event(
    start: Start, gated: FakeAgents
) -> None:
    """While a workflow runs, its process renews the lease: for many times its ttl every
    other process sees it ``held`` and ends nothing; the final event is stored, then the
    lease released, so the session reads ``ended``, never ``lost``."""
    ttl = 3 * LEASE_TTL  # renewed every LEASE_TTL: slack for a busy machine
    a, b = await start(gated, lease_ttl=ttl), await start(lease_ttl=ttl)
    session_id = new_session_id()
    async with hub_of(b).subscribe(session_id) as sub:
        await runner_of(a).start(session_id, "chairs")
        await demand_started(sub)
        for _ in range(3):  # three lease lifetimes
            await asyncio.sleep(ttl)  # time passing: the lease would lapse unrenewed
            assert await runner_of(b).monitor.check() == []
            assert await hub_of(b).broker.lease_states([session_id]) == {session_id: "held"}
        gated.gate.set()  # type: ignore[union-attr]
        events = await until_final(sub)
    assert events[-1]["type"] == "complete" and events[-1]["final"] is True
    assert await hub_of(b).broker.lease_states([session_id]) == {session_id: "ended"}
    broker = hub_of(a).broker
    assert isinstance(broker, RedisBroker)
    async with Redis.from_url(broker._url) as redis:
        assert await redis.exists(broker._lease_key(session_id)) == 0


@pytest.mark.parametrize("broker_kind", ["redis", "memory"])
async def test_one_process_asked_twice_at_once_runs_one_workflow(
    start: Start, gated: FakeAgents
) -> None:
    """Two run-workflows for one session reach one process at once: one runs, the other gets
    409. (A process may claim again a claim of its own that nothing acted on; never one
    it is acting on.) While it runs, and once it has ended, a third gets 409 too."""
    server = await start(gated)
    runner = runner_of(server)
    session_id = new_session_id()
    results = await asyncio.gather(
        runner.start(session_id, "chairs"),
        runner.start(session_id, "chairs"),
        return_exceptions=True,
    )
    tasks = [r for r in results if isinstance(r, asyncio.Task)]
    conflicts = [r for r in results if isinstance(r, Conflict)]
    assert len(tasks) == 1 and len(conflicts) == 1, results
    with pytest.raises(Conflict):
        await runner.start(session_id, "chairs")
    gated.gate.set()  # type: ignore[union-attr]
    assert (await tasks[0]).status == "complete"
    with pytest.raises(Conflict):
        await runner.start(session_id, "chairs")


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_a_process_that_stops_renewing_has_its_session_ended_elsewhere(
    start: Start, gated: FakeAgents
) -> None:
    """When the process running a workflow stops renewing its lease (as a dead one would),
    another process's monitor stores the final ``workflow_interrupted`` error (agent
    orchestrator, no details) within ``lease_ttl`` + ``lease_check_interval``, and that
    process's subscribers get it as their last event; the workflow, if it ever goes on,
    stops at its next event."""
    a = await start(gated)
    b = await start(lease_check_interval=0.05)
    session_id = new_session_id()
    async with hub_of(b).subscribe(session_id) as sub:
        await runner_of(a).start(session_id, "chairs")
        await demand_started(sub)
        await runner_of(a).leases.close()  # A stops renewing: its lease lapses
        events = await until_final(sub, timeout=LEASE_TTL + 0.05 + EVENT_TIMEOUT)
    assert is_interrupted_by_a_monitor(events[-1]), events[-1]
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[-1]["seq"] + 1))

    gated.gate.set()  # type: ignore[union-attr]
    async with asyncio.timeout(EVENT_TIMEOUT):
        while runner_of(a).running:  # A's workflow stops at its next event (SessionEnded)
            await asyncio.sleep(POLL_INTERVAL)
    replay = await hub_of(a).broker.read(session_id, None)
    assert [payload(e) for e in replay.events][-1] == events[-1]


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_sessions_without_a_workflow_are_never_ended_by_a_monitor(start: Start) -> None:
    """A session that only other services publish into (no claim, no lease), or that nobody
    has started yet, is left alone however often the monitors look."""
    a, b = await start(), await start()
    published, waiting = new_session_id(), new_session_id()
    await hub_of(a).publish(
        ProgressEvent(session_id=published, agent="demand", status="step", progress=1)
    )
    async with hub_of(b).subscribe(published), hub_of(b).subscribe(waiting):
        for _ in range(3):
            assert await runner_of(b).monitor.check() == []
        states = await hub_of(b).broker.lease_states([published, waiting])
    assert states == {published: "none", waiting: "gone"}


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_monitors_racing_for_one_session_store_one_final_event(start: Start) -> None:
    """Two processes notice the same lost lease at once: one final event is stored, the
    other monitor's append is refused (the session has ended) and ignored."""
    a, b = await start(), await start()
    session_id = new_session_id()
    assert await hub_of(a).broker.claim(session_id, Lease("a-dead-process", LEASE_TTL))
    async with hub_of(a).subscribe(session_id) as sub_a, hub_of(b).subscribe(session_id) as sub_b:
        async with asyncio.timeout(EVENT_TIMEOUT):
            while await hub_of(a).broker.lease_states([session_id]) != {session_id: "lost"}:
                await asyncio.sleep(POLL_INTERVAL)
        ended = await asyncio.gather(runner_of(a).monitor.check(), runner_of(b).monitor.check())
        assert sorted(ended) == [[], [session_id]]
        seen = [await until_final(sub) for sub in (sub_a, sub_b)]
    assert seen[0] == seen[1] and len(seen[0]) == 1
    assert is_interrupted_by_a_monitor(seen[0][0]) and seen[0][0]["seq"] == 1


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_a_session_the_store_lost_under_a_running_workflow_is_ended_after_a_grace(
    start: Start, settings: Settings
) -> None:
    """The store loses a session whose workflow was seen running (Redis restarted empty)
    and nobody takes its lease again: a live owner would have at its next renewal, so
    the monitor waits two ``lease_ttl``; then it ends the session in a new epoch, and its
    subscribers get ``replay_gap``, then ``workflow_interrupted``."""
    a, b = await start(), await start()
    session_id = new_session_id()
    broker = hub_of(a).broker
    assert isinstance(broker, RedisBroker)
    assert await broker.claim(session_id, Lease("a-process", 30))
    first = await hub_of(a).publish(
        ProgressEvent(session_id=session_id, agent="demand", status="step", progress=1)
    )
    async with hub_of(b).subscribe(session_id) as sub:
        assert (await sub.get(EVENT_TIMEOUT)) is not None
        assert await runner_of(b).monitor.check() == []  # seen held
        async with Redis.from_url(settings.redis_url) as redis:
            keys = await redis.keys(f"{settings.redis_key_prefix}:*")
            await redis.delete(*keys)  # the store forgets everything (and A is gone too)
        lost_at = asyncio.get_running_loop().time()
        assert await runner_of(b).monitor.check() == []  # within the grace: not yet
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not await runner_of(b).monitor.check():
                await asyncio.sleep(POLL_INTERVAL)
        assert asyncio.get_running_loop().time() - lost_at >= 2 * LEASE_TTL
        frames = await until_final(sub)
    assert frames[0]["type"] == "error" and frames[0]["code"] == "replay_gap"
    assert "id" not in frames[0]
    assert is_interrupted_by_a_monitor(frames[-1]) and frames[-1]["seq"] == 1
    assert frames[-1]["id"].rpartition("-")[0] != first.epoch


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_quiet_sessions_are_asked_about_every_tenth_round(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session only services publish into (``none``) and an ended one are asked about
    every ``QUIET_ROUNDS`` rounds; a session with a running workflow and one that
    nobody has started yet, every round."""
    a, b = await start(), await start()
    published, ended, running, waiting = (new_session_id() for _ in range(4))
    for session_id in (published, ended):
        await hub_of(a).publish(
            ProgressEvent(session_id=session_id, agent="demand", status="step", progress=1)
        )
    await hub_of(a).publish(CompleteEvent(session_id=ended, agent="orchestrator", final=True))
    assert await hub_of(a).broker.claim(running, Lease("a-live-process", 30))
    broker = hub_of(b).broker
    asked: list[set[str]] = []
    lease_states = broker.lease_states

    async def recorded(session_ids: Collection[str]) -> dict[str, LeaseState]:
        asked.append(set(session_ids))
        return await lease_states(session_ids)

    monkeypatch.setattr(broker, "lease_states", recorded)
    async with contextlib.AsyncExitStack() as stack:
        for session_id in (published, ended, running, waiting):
            await stack.enter_async_context(hub_of(b).subscribe(session_id))
        for _ in range(2 * QUIET_ROUNDS):
            assert await runner_of(b).monitor.check() == []
    rounds = {
        session_id: [n + 1 for n, ids in enumerate(asked) if session_id in ids]
        for session_id in (published, ended, running, waiting)
    }
    assert rounds[published] == rounds[ended] == [1, QUIET_ROUNDS, 2 * QUIET_ROUNDS]
    assert rounds[running] == rounds[waiting] == list(range(1, 2 * QUIET_ROUNDS + 1))


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_a_quiet_session_claimed_again_after_the_store_lost_it_is_still_ended(
    start: Start, settings: Settings
) -> None:
    """The rare case quiet sessions pay for: a session only services published into is
    lost by the store (it expired), a workflow claims its id again and its process dies.
    A monitor that had found it quiet still ends it, within ``QUIET_ROUNDS`` rounds."""
    a, b = await start(), await start()
    session_id = new_session_id()
    await hub_of(a).publish(
        ProgressEvent(session_id=session_id, agent="demand", status="step", progress=1)
    )
    async with hub_of(b).subscribe(session_id) as sub:
        assert (await sub.get(EVENT_TIMEOUT)) is not None
        assert await runner_of(b).monitor.check() == []  # found quiet ("none")
        async with Redis.from_url(settings.redis_url) as redis:
            await redis.delete(*await redis.keys(f"{settings.redis_key_prefix}:{{{session_id}}}:*"))
        assert await hub_of(a).broker.claim(session_id, Lease("a-dead-process", LEASE_TTL))
        async with asyncio.timeout(EVENT_TIMEOUT):
            while await hub_of(a).broker.lease_states([session_id]) != {session_id: "lost"}:
                await asyncio.sleep(POLL_INTERVAL)
        rounds = 0
        while rounds < QUIET_ROUNDS:
            rounds += 1
            if await runner_of(b).monitor.check() == [session_id]:
                break
        assert rounds < QUIET_ROUNDS  # the round that asks every session ended it
        frames = await until_final(sub)
    assert is_interrupted_by_a_monitor(frames[-1])


# --- in memory ---------------------------------------------------------------------------------


async def test_in_memory_a_running_workflow_is_never_taken_for_lost(
    start: Start, gated: FakeAgents
) -> None:
    """On the in-memory broker (one process) the lease of a running workflow is held
    however long it runs and whatever its ttl: the monitor never ends its session."""
    server = await start(gated, lease_ttl=0.01, lease_check_interval=0.01)
    session_id = new_session_id()
    async with hub_of(server).subscribe(session_id) as sub:
        await runner_of(server).start(session_id, "chairs")
        await demand_started(sub)
        for _ in range(5):
            assert await runner_of(server).monitor.check() == []
            assert await hub_of(server).broker.lease_states([session_id]) == {session_id: "held"}
        gated.gate.set()  # type: ignore[union-attr]
        events = await until_final(sub)
    assert events[-1]["type"] == "complete"


# --- the renewal task, on a store that fails when told ----------------------------------------


class FlakyStore(MemoryBroker):
    """The in-memory store, whose appends fail while ``down`` (or, into the sessions in
    ``refused``, always) and whose renewals wait, once they have their answer, until the
    test lets them return."""

    def __init__(self) -> None:
        super().__init__(100, 60.0)
        self.down = False
        self.refused: set[str] = set()
        self.renewing = asyncio.Event()
        self.answer = asyncio.Event()

    async def append(
        self,
        session_id: str,
        type: str,
        body: str,
        final: bool,
        key: IdempotencyKey | None = None,
    ) -> StoredEvent:
        if self.down or session_id in self.refused:
            raise ServiceUnavailable("The event store is unavailable; try again shortly.")
        return await super().append(session_id, type, body, final, key)

    async def renew_leases(self, session_ids: Collection[str], lease: Lease) -> set[str]:
        held = await super().renew_leases(session_ids, lease)
        self.renewing.set()
        await self.answer.wait()
        return held


async def test_a_final_event_owed_while_a_renewal_is_on_its_way_is_kept() -> None:
    """A workflow claims, runs and owes its final event (the store is down) while a renewal
    that did not ask about it is on its way: that renewal's answer does not count as
    "not held", so the event is kept and stored once the store is back."""
    store = FlakyStore()
    hub = Hub(store, queue_size=100, metrics=Metrics())
    leases = WorkflowLeases(hub, 30.0)
    first, second = new_session_id(), new_session_id()
    assert await store.claim(first, leases.lease)
    leases.hold(first)
    renewal = asyncio.create_task(leases.tick())
    await store.renewing.wait()  # asked about the first session only

    assert await store.claim(second, leases.lease)
    leases.hold(second)
    store.down = True
    final = CompleteEvent(session_id=second, agent="orchestrator", final=True)
    assert not await leases.finish(second, final)
    assert leases.owed == 1
    store.down = False
    store.answer.set()
    await renewal
    assert leases.owed == 1 and leases.holds(second)  # kept for the next tick

    await leases.tick()
    assert leases.owed == 0
    replay = await store.read(second, None)
    assert [e.final for e in replay.events] == [True]
    await leases.close()


async def test_an_owed_final_event_the_store_refuses_does_not_hold_back_the_others() -> None:
    """Two final events are owed; once the store is back, it refuses the first one's
    session alone (say a key of its was overwritten): the second is stored in the same
    tick rather than wait behind the first until the first is given up."""
    store = FlakyStore()
    store.answer.set()  # renewals answer at once
    leases = WorkflowLeases(Hub(store, queue_size=100, metrics=Metrics()), 30.0)
    first, second = new_session_id(), new_session_id()
    store.down = True
    for session_id in (first, second):
        assert await store.claim(session_id, leases.lease)
        leases.hold(session_id)
        final = CompleteEvent(session_id=session_id, agent="orchestrator", final=True)
        assert not await leases.finish(session_id, final)
    store.down, store.refused = False, {first}

    await leases.tick()  # the first is refused, the store answers: the second goes on
    assert leases.owed == 1 and leases.holds(first) and not leases.holds(second)
    replay = await store.read(second, None)
    assert [e.final for e in replay.events] == [True]
    await leases.close()


class BrokenOnce(MemoryBroker):
    """The in-memory store, whose first renewal fails as a bug would."""

    def __init__(self) -> None:
        super().__init__(100, 60.0)
        self.calls = 0
        self.renewed = asyncio.Event()

    async def renew_leases(self, session_ids: Collection[str], lease: Lease) -> set[str]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in a renewal")
        self.renewed.set()
        return await super().renew_leases(session_ids, lease)


async def test_an_unexpected_error_in_a_renewal_does_not_stop_the_renewals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renewal that raises what it should not is logged, and the next tick renews again:
    otherwise every lease of the process would lapse and other processes would end its
    running workflows."""
    store = BrokenOnce()
    leases = WorkflowLeases(Hub(store, queue_size=100, metrics=Metrics()), 0.03)
    session_id = new_session_id()
    assert await store.claim(session_id, leases.lease)
    leases.hold(session_id)  # starts the renewal task
    async with asyncio.timeout(EVENT_TIMEOUT):
        await store.renewed.wait()
    assert store.calls >= 2
    assert "lease renewal failed" in caplog.text
    await leases.close()
