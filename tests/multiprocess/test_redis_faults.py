"""Redis faults (issue 5, "Faults"), with a ``redis-server`` of the test's own that it stops
and restarts EMPTY (no persistence), or from an older snapshot, and two apps in this
process standing for two server processes on it.

What is promised, and tested here:

* while Redis is down, ``/readyz`` answers 503 with the JSON error shape, and nothing
  that reaches a client names Redis, its host or its port;
* a workflow whose events cannot be stored (after the broker's retries with back-off)
  ends with a sanitized final ``workflow_interrupted`` error; that event cannot be stored
  while Redis is down either, so its process keeps it (and the workflow's lease) and
  stores it as soon as Redis is back. Subscribers, on that process and elsewhere, keep
  their streams (heartbeats go on), then get ``replay_gap`` (their position belongs to the
  earlier life of the stream) and that final event, and the stream ends: never an
  endless wait;
* the processes recover without a restart: ``/readyz`` is 200 again, new streams open,
  new workflows run;
* a client resuming with an id from before gets ``replay_gap``, never a silent skip;
* a Redis back from an older snapshot (writes lost) gives the stream a new epoch, so
  that open streams get ``replay_gap`` rather than drop or skip the events that reuse
  the lost seqs;
* a claim that Redis took but whose answers were lost (run-workflow answered 503) does
  not keep its session id from being used: the client's retry runs the workflow; and a
  process that could not reach Redis does not store the final event it owes into a
  session that another workflow claimed meanwhile (Redis restarted empty).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import BaseTestServer
from redis.asyncio import Redis

from server.api import WORKFLOW_RUNNER
from server.app import create_app
from server.brokers.redis import RedisBroker
from server.config import Settings
from server.messages import ErrorEvent
from server.workflow import WorkflowRunner
from tests.brokers.redis_support import FreezingProxy, LoseFirstAnswer
from tests.clients import (
    Event,
    EventStream,
    app_of,
    http_url,
    is_control_error,
    new_session_id,
    open_aiohttp_sse,
    open_aiohttp_ws,
    read_to_end,
    read_until,
    stored,
    wait_until,
    ws_url,
)
from tests.conftest import hub_of
from tests.hardening.support import FakeAgents
from tests.redis_support import RedisServer, ServerFactory
from tests.timing import EVENT_TIMEOUT

# Short fault timings, so that a test sees each phase within seconds.
BROKER_TIMEOUTS: dict[str, Any] = {
    "op_timeout": 0.5,
    "connect_timeout": 0.5,
    "retry_budget": 0.5,
    "ping_timeout": 0.5,
    "watch_timeout": 1.0,
    "idle_ping": 1.0,
}
LEASE_TTL = 1.5  # renewed every 0.5 s: the owed final event is retried as often
RECOVERY_TIMEOUT = 15.0  # Redis is back -> the final event has reached every subscriber

Start = Callable[..., Awaitable[BaseTestServer]]


@pytest.fixture
async def redis(own_redis: ServerFactory) -> RedisServer:
    return own_redis()


@pytest.fixture
async def start(
    aiohttp_server: Callable[..., Awaitable[BaseTestServer]], settings: Settings, redis: RedisServer
) -> Start:
    """Start an app ("process") on the test's own Redis, with short fault timings."""
    changed = settings.replace(
        broker="redis",
        redis_url=redis.url,
        lease_ttl=LEASE_TTL,
        lease_check_interval=0.1,
    )

    async def factory(agents: FakeAgents | None = None, url: str | None = None) -> BaseTestServer:
        broker = RedisBroker(
            url or redis.url,
            changed.buffer_size,
            changed.session_ttl,
            key_prefix=changed.redis_key_prefix,
            **BROKER_TIMEOUTS,
        )
        app = create_app(changed, broker=broker, agents=agents or FakeAgents())
        return await aiohttp_server(app)

    return factory


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


def runner_of(server: BaseTestServer) -> WorkflowRunner:
    return app_of(server)[WORKFLOW_RUNNER]


async def readyz(http: ClientSession, server: BaseTestServer) -> tuple[int, dict[str, Any]]:
    async with http.get(http_url(server, "/readyz")) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def wait_readyz(http: ClientSession, server: BaseTestServer, status: int) -> dict[str, Any]:
    async with asyncio.timeout(RECOVERY_TIMEOUT):
        while True:
            got, body = await readyz(http, server)
            if got == status:
                return body


async def run_workflow(
    http: ClientSession, server: BaseTestServer, session_id: str, status: int = 202
) -> tuple[Any, str]:
    """Start a workflow and check the answer's status; its headers and body."""
    async with http.post(
        http_url(server, "/api/orchestrator/run-workflow"),
        json={"strategy_description": "chairs", "session_id": session_id},
    ) as response:
        text = await response.text()
        assert response.status == status, text
        return response.headers, text


def demand_started(event: Event) -> bool:
    return event.get("agent") == "demand" and event["type"] == "agent_status"


def assert_sanitized(text: str, redis: RedisServer) -> None:
    for secret in (redis.url, f":{redis.port}", "redis://", "127.0.0.1", "Traceback"):
        assert secret not in text, secret


async def test_redis_restarting_empty_mid_workflow_ends_it_cleanly_and_everything_recovers(
    start: Start, http: ClientSession, redis: RedisServer
) -> None:
    """Redis stops while a workflow runs on A and subscribers follow it on A (WebSocket)
    and B (SSE): both processes report not ready; the workflow's next event cannot be
    stored, so it ends with a sanitized ``workflow_interrupted`` that A keeps until Redis
    is back. Redis returns empty: both are ready again without a restart, both subscribers
    get ``replay_gap`` then that final event (seq 1 of a new epoch), then the end of their
    stream; a client resuming with an id from before gets ``replay_gap`` too; and a new
    workflow runs to its end."""
    gated = FakeAgents()
    gated.gate = asyncio.Event()
    a, b = await start(gated), await start()
    session_id = new_session_id()
    async with (
        open_aiohttp_ws(http, ws_url(a, f"/ws/orchestrator/{session_id}")) as ws,
        open_aiohttp_sse(http, http_url(b, f"/sse/orchestrator/{session_id}")) as sse,
    ):
        await run_workflow(http, a, session_id)
        before = {
            "ws": await read_until(ws, demand_started),
            "sse": await read_until(sse, demand_started),
        }
        old_id = stored(before["ws"])[-1]["id"]

        redis.stop()
        for server in (a, b):
            body = await wait_readyz(http, server, 503)
            assert set(body) == {"error", "code", "reference"}
            assert body["code"] == "service_unavailable"
            assert_sanitized(json.dumps(body), redis)

        gated.gate.set()  # the workflow goes on; its next event cannot be stored
        # The final event is owed, and the workflow itself has ended (its task is gone a
        # turn of the loop after it made the event owed: both are waited for).
        await wait_until(
            lambda: runner_of(a).leases.owed == 1 and runner_of(a).running == 0,
            "the workflow to end with its final event owed",
        )

        redis.start()  # empty: no persistence
        for server in (a, b):
            assert await wait_readyz(http, server, 200) == {"status": "ready"}
        after: dict[str, list[Event]] = {}
        streams: dict[str, EventStream] = {"ws": ws, "sse": sse}
        for name, stream in streams.items():
            after[name] = await read_to_end(stream, RECOVERY_TIMEOUT)
        assert ws.close_code == 1000
    assert runner_of(a).leases.owed == 0

    old_epoch = old_id.rpartition("-")[0]
    for name in ("ws", "sse"):
        events = [event for event in after[name] if event["type"] != "heartbeat"]
        # What was stored before Redis stopped and not read yet; then the gap; then the end.
        cut = next(i for i, event in enumerate(events) if "id" not in event)
        earlier, (gap, *rest) = events[:cut], events[cut:]
        assert all(event["id"].startswith(old_epoch + "-") for event in earlier)
        seen = stored(before[name] + earlier)
        assert [event["seq"] for event in seen] == list(range(1, len(seen) + 1))
        assert is_control_error(gap, "replay_gap"), (name, gap)
        assert len(rest) == 1, (name, rest)
        [last] = rest
        assert (last["type"], last["code"], last["agent"], last["final"], last["seq"]) == (
            "error",
            "workflow_interrupted",
            "orchestrator",
            True,
            1,
        )
        assert "event store" in last["error"] and last["details"].startswith("Reference ")
        assert_sanitized(json.dumps(last), redis)
        assert last["id"].rpartition("-")[0] != old_epoch  # a new life of the stream
    assert after["ws"][-1] == after["sse"][-1]

    # A client resuming with an id from before Redis restarted: replay_gap, never a skip.
    path = f"/sse/orchestrator/{session_id}"
    async with open_aiohttp_sse(http, http_url(b, path), {"Last-Event-ID": old_id}) as resumed:
        events = await read_to_end(resumed)
    assert is_control_error(events[0], "replay_gap")
    assert stored(events) == [after["sse"][-1]]

    # New work runs on both processes, without a restart.
    fresh = new_session_id()
    async with open_aiohttp_ws(http, ws_url(a, f"/ws/orchestrator/{fresh}")) as ws:
        await run_workflow(http, b, fresh)
        story = stored(await read_to_end(ws))
    assert [event["seq"] for event in story] == list(range(1, len(story) + 1))
    assert story[-1]["type"] == "complete" and story[-1]["final"] is True


async def test_while_redis_is_down_requests_fail_cleanly_and_work_again_once_it_is_back(
    start: Start, http: ClientSession, redis: RedisServer
) -> None:
    """While Redis is down: publishing and starting a workflow get 503 with the JSON error
    shape, an SSE stream gets 503, a WebSocket gets a ``service_unavailable`` error event
    then 1013 (try again later); none names Redis. Once it is back each works again."""
    server = await start()
    session_id = new_session_id()
    redis.stop()
    await wait_readyz(http, server, 503)

    async with http.post(
        http_url(server, f"/api/sessions/{session_id}/events"),
        json={"type": "progress", "agent": "demand", "status": "x", "progress": 1},
    ) as response:
        assert response.status == 503
        body = await response.json()
        assert set(body) == {"error", "code", "reference"}
        assert response.headers["Retry-After"]
        assert_sanitized(await response.text(), redis)
    _, text = await run_workflow(http, server, session_id, 503)
    assert_sanitized(text, redis)
    async with open_aiohttp_sse(http, http_url(server, f"/sse/orchestrator/{session_id}")) as sse:
        assert sse.status == 503
        assert_sanitized((await sse.read_body()).decode(), redis)
    async with open_aiohttp_ws(http, ws_url(server, f"/ws/orchestrator/{session_id}")) as ws:
        events = await read_to_end(ws, EVENT_TIMEOUT)
        assert ws.close_code == 1013, ws.close_code  # try again later: reconnect, resume
    assert len(events) == 1 and is_control_error(events[0], "service_unavailable")
    assert_sanitized(json.dumps(events), redis)

    redis.start()
    await wait_readyz(http, server, 200)
    async with open_aiohttp_ws(http, ws_url(server, f"/ws/orchestrator/{session_id}")) as ws:
        await run_workflow(http, server, session_id)
        story = stored(await read_to_end(ws))
    assert story[-1]["type"] == "complete" and story[0]["seq"] == 1


async def test_a_retry_of_a_run_workflow_answered_503_after_redis_took_its_claim_runs(
    start: Start, http: ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis runs the claim, but every answer is lost until the retry budget is spent:
    run-workflow answers a clean 503. The client retries with the same session id, as the
    503 tells it to, and gets 202 and the whole workflow, not 409 "already has a workflow"
    until the claim expires (session_ttl)."""
    server = await start()
    broker = hub_of(server).broker
    assert isinstance(broker, RedisBroker)
    lossy = LoseFirstAnswer(broker._claim_script, lost=1_000_000)
    monkeypatch.setattr(broker, "_claim_script", lossy)
    session_id = new_session_id()
    headers, text = await run_workflow(http, server, session_id, 503)
    assert json.loads(text)["code"] == "service_unavailable" and headers["Retry-After"]
    assert lossy.calls >= 2  # each attempt ran in Redis
    async with Redis.from_url(broker._url) as redis:
        assert await redis.hget(broker._state_key(session_id), "claimed")

    lossy.lost = 0
    async with open_aiohttp_ws(http, ws_url(server, f"/ws/orchestrator/{session_id}")) as ws:
        await run_workflow(http, server, session_id)
        story = stored(await read_to_end(ws))
    assert story[0]["seq"] == 1 and story[-1]["type"] == "complete" and story[-1]["final"]


async def test_a_final_event_owed_for_a_session_claimed_again_elsewhere_is_not_stored(
    start: Start, redis: RedisServer, http: ClientSession
) -> None:
    """A claims a session, then loses Redis before storing anything: the final event of its
    run is owed. Redis restarts empty, and B starts a workflow with the same session id.
    When A reaches Redis again its renewal finds the lease B's, and A drops the event
    instead of ending B's run with it."""
    proxy = await FreezingProxy.start(redis.url)
    try:
        a = await start(url=proxy.url(redis.url))
        b = await start()
        leases = runner_of(a).leases
        session_id = new_session_id()
        assert await hub_of(a).broker.claim(session_id, leases.lease)
        leases.hold(session_id)

        await proxy.cut()  # A cannot reach Redis
        final = ErrorEvent(
            session_id=session_id,
            agent="orchestrator",
            code="workflow_interrupted",
            error="The forecast was interrupted.",
            final=True,
        )
        assert not await leases.finish(session_id, final)
        assert leases.owed == 1
        redis.stop()
        redis.start()  # empty: the session is gone
        await wait_readyz(http, b, 200)
        b_broker = hub_of(b).broker
        assert await b_broker.claim(session_id, runner_of(b).leases.lease)

        proxy.restore()
        await wait_until(lambda: leases.owed == 0, "A to settle its owed final event")
        assert not leases.holds(session_id)
        assert (await b_broker.read(session_id, None)).events == []
        assert await b_broker.lease_states([session_id]) == {session_id: "held"}
    finally:
        await proxy.close()


async def test_redis_back_from_an_older_snapshot_mid_workflow_tells_every_stream(
    start: Start, http: ClientSession, redis: RedisServer
) -> None:
    """Redis restarts from a snapshot older than what the streams have read (as after a
    crash with RDB snapshots or AOF ``everysec``, or a failover to a replica that lagged):
    the seqs after the snapshot would name new events, which subscribers on A (SSE) and B
    (WebSocket) would drop as already read, or skip silently. The stream takes a new epoch
    instead, so each subscriber gets ``replay_gap``, the retained events under the new
    epoch, then the rest of the workflow to its final event."""
    gated = FakeAgents()
    gated.gate = asyncio.Event()
    a, b = await start(gated), await start()
    session_id = new_session_id()
    async with (
        open_aiohttp_sse(http, http_url(a, f"/sse/orchestrator/{session_id}")) as sse,
        open_aiohttp_ws(http, ws_url(b, f"/ws/orchestrator/{session_id}")) as ws,
    ):
        await run_workflow(http, a, session_id)
        streams: dict[str, EventStream] = {"sse": sse, "ws": ws}
        for stream in streams.values():
            await read_until(stream, demand_started)
        async with Redis.from_url(redis.url) as admin:
            await admin.save()
        for n in (1, 2):  # stored after the snapshot, and read by both
            async with http.post(
                http_url(a, f"/api/sessions/{session_id}/events"),
                json={"type": "agent_status", "agent": "demand", "status": "x", "progress": n},
            ) as response:
                assert response.status == 202
                lost_id = (await response.json())["id"]

        def is_last_lost(event: Event) -> bool:
            return bool(event.get("id") == lost_id)

        for stream in streams.values():
            await read_until(stream, is_last_lost)

        redis.stop()
        redis.start()  # from its snapshot: without the last two events
        for server in (a, b):
            await wait_readyz(http, server, 200)
        gated.gate.set()
        after = {name: await read_to_end(s, RECOVERY_TIMEOUT) for name, s in streams.items()}

    old_epoch = lost_id.rpartition("-")[0]
    for name, events in after.items():
        events = [event for event in events if event["type"] != "heartbeat"]
        assert is_control_error(events[0], "replay_gap"), (name, events[0])
        rest = stored(events[1:])
        assert [event["seq"] for event in rest] == list(range(1, len(rest) + 1)), name
        assert {event["id"].rpartition("-")[0] for event in rest} != {old_epoch}, name
        assert len({event["id"].rpartition("-")[0] for event in rest}) == 1, name
        assert rest[-1]["type"] == "complete" and rest[-1]["final"] is True, name
    assert after["sse"][-1] == after["ws"][-1]
