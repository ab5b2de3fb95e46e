"""End to end over real sockets: the real workflow seen identically by every client over
both transports, late and resuming subscribers, many concurrent sessions, clients that drop
abruptly, and bad input that breaks nothing else (issue 2, "Tests"); on both brokers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector
from aiohttp.test_utils import BaseTestServer

from server.config import Settings
from server.messages import ProgressEvent
from tests.clients import (
    AGENTS,
    STRATEGY,
    AppClient,
    CurlSSE,
    Event,
    EventStream,
    assert_whole_story,
    connections,
    final,
    http_url,
    ids,
    is_control_error,
    new_session_id,
    open_aiohttp_sse,
    open_aiohttp_ws,
    open_curl_sse,
    open_websockets_ws,
    progress,
    publish,
    read_events,
    read_to_end,
    read_until,
    seqs,
    stored,
    wait_until,
    ws_url,
)
from tests.conftest import BOTH_BROKERS, ClientFactory, hub_of
from tests.timing import CLEANUP_TIMEOUT, WORKFLOW_TIMEOUT

pytestmark = BOTH_BROKERS  # every test runs on the in-memory broker and on Redis

CLIENTS = ("aiohttp-ws", "websockets-ws", "aiohttp-sse", "curl-sse")


def ws_path(session_id: str, last_event_id: str | None = None) -> str:
    query = f"?last_event_id={last_event_id}" if last_event_id else ""
    return f"/ws/orchestrator/{session_id}{query}"


def sse_path(session_id: str) -> str:
    return f"/sse/orchestrator/{session_id}"


@contextlib.asynccontextmanager
async def subscriber_session() -> AsyncIterator[ClientSession]:
    """A client session without aiohttp's default cap of 100 connections."""
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        yield session


def open_client(
    kind: str,
    server: BaseTestServer,
    session: ClientSession,
    session_id: str,
    last_event_id: str | None = None,
) -> AbstractAsyncContextManager[Any]:
    """A subscriber of ``session_id`` of one of the four kinds, resuming after
    ``last_event_id`` the way that client would (query on WebSocket, header on SSE)."""
    if kind == "aiohttp-ws":
        return open_aiohttp_ws(session, ws_url(server, ws_path(session_id, last_event_id)))
    if kind == "websockets-ws":
        return open_websockets_ws(ws_url(server, ws_path(session_id, last_event_id)))
    headers = {"Last-Event-ID": last_event_id} if last_event_id else None
    url = http_url(server, sse_path(session_id))
    if kind == "aiohttp-sse":
        return open_aiohttp_sse(session, url, headers)
    return open_curl_sse(url, headers)


async def run_workflow(client: AppClient, session_id: str) -> None:
    response = await client.post(
        "/api/orchestrator/run-workflow",
        json={"strategy_description": STRATEGY, "session_id": session_id},
    )
    assert response.status == 202, await response.text()


def assert_workflow_story(events: list[Event], session_id: str) -> None:
    """The stream of one successful workflow, as PROTOCOL.md "Starting the workflow" says."""
    story = stored(events)
    assert seqs(story) == list(range(1, len(story) + 1))
    assert {event["session_id"] for event in events} == {session_id}
    overall = [e["progress"] for e in story if e["type"] == "progress"]
    assert overall == sorted(overall) and len(overall) >= 4
    assert all(e["agent"] == "orchestrator" for e in story if e["type"] == "progress")
    for agent in AGENTS:
        own = [e for e in story if e.get("agent") == agent]
        assert own[0]["type"] == "agent_status" and own[0]["progress"] == 0, own[0]
        assert own[-1]["type"] == "complete" and own[-1]["final"] is False, own[-1]
        assert all(e["type"] == "agent_status" for e in own[1:-1])
    starts = [next(e["seq"] for e in story if e.get("agent") == agent) for agent in AGENTS]
    assert starts == sorted(starts), "agents ran out of order"
    last = story[-1]
    assert (last["type"], last["agent"], last["final"]) == ("complete", "orchestrator", True)
    assert {"parameters", "forecast", "inventory", "pricing"} <= set(last["data"]["result"])
    assert not any(event.get("final") for event in story[:-1])


# --- the real workflow ------------------------------------------------------------------------


async def test_workflow_is_seen_identically_by_every_client_and_by_late_ones(
    client: AppClient,
) -> None:
    """The real workflow (strategy "15% off outdoor furniture for 8 weeks") reaches two
    WebSocket and two SSE clients as the same events, same ids, same payloads, in seq order,
    ending with the orchestrator's final ``complete``; clients connecting after the end get
    the same whole story; the session snapshot holds the same result."""
    server, session_id = client.server, new_session_id()
    async with subscriber_session() as session, AsyncExitStack() as stack:
        live = [
            await stack.enter_async_context(open_client(kind, server, session, session_id))
            for kind in CLIENTS
        ]
        await wait_until(lambda: hub_of(server).subscriber_count == len(CLIENTS), "subscribers")
        await run_workflow(client, session_id)
        seen = await asyncio.gather(*(read_to_end(stream) for stream in live))
        assert live[0].close_code == live[1].close_code == 1000
        assert await live[3].exit_code() == 0

        late = [
            await stack.enter_async_context(open_client(kind, server, session, session_id))
            for kind in CLIENTS
        ]
        seen_late = await asyncio.gather(*(read_to_end(stream) for stream in late))

    story = stored(seen[0])
    assert_workflow_story(story, session_id)
    for kind, events in zip(CLIENTS * 2, [*seen, *seen_late], strict=True):
        assert stored(events) == story, f"{kind} saw another story"
        assert all(event["type"] == "heartbeat" for event in events if "id" not in event)
    snapshot = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert snapshot["state"] == "complete"
    assert snapshot["last_event_id"] == story[-1]["id"]
    assert snapshot["result"] == story[-1]["data"]["result"]


def demand_started(event: Event) -> bool:
    return event.get("agent") == "demand" and event["type"] == "agent_status"


async def test_resume_mid_workflow_loses_and_repeats_nothing(client: AppClient) -> None:
    """Each client disconnects once the demand agent has started and reconnects with the
    last id it saw (``?last_event_id=`` on WebSocket, ``Last-Event-ID`` on SSE): the two
    parts together are exactly the stream a client that stayed connected saw."""
    server, session_id = client.server, new_session_id()
    witness_url = ws_url(server, ws_path(session_id))
    async with subscriber_session() as session, open_aiohttp_ws(session, witness_url) as witness:
        async with AsyncExitStack() as stack:
            first = [
                await stack.enter_async_context(open_client(kind, server, session, session_id))
                for kind in CLIENTS
            ]
            await wait_until(lambda: hub_of(server).subscriber_count == 5, "subscribers")
            await run_workflow(client, session_id)
            before = await asyncio.gather(
                *(read_until(stream, demand_started, WORKFLOW_TIMEOUT) for stream in first)
            )
            whole = asyncio.create_task(read_to_end(witness))
            await stack.aclose()  # disconnect the four; the witness stays connected
            async with AsyncExitStack() as again:
                resumed = [
                    await again.enter_async_context(
                        open_client(kind, server, session, session_id, stored(part)[-1]["id"])
                    )
                    for kind, part in zip(CLIENTS, before, strict=True)
                ]
                after = await asyncio.gather(*(read_to_end(stream) for stream in resumed))
            witnessed = await whole

    assert_workflow_story(witnessed, session_id)
    for kind, part, rest in zip(CLIENTS, before, after, strict=True):
        assert not any(is_control_error(event, "replay_gap") for event in rest), kind
        assert stored(part) + stored(rest) == stored(witnessed), kind


async def test_four_real_workflows_at_once_each_reach_only_their_own_subscribers(
    client: AppClient,
) -> None:
    """Four real workflows running concurrently, each watched over both transports: every
    client gets its own session's whole workflow, identical across transports."""
    server = client.server
    sessions = [new_session_id() for _ in range(4)]
    kinds = ("aiohttp-ws", "websockets-ws", "aiohttp-sse")
    async with subscriber_session() as session, AsyncExitStack() as stack:
        streams = {
            (session_id, kind): await stack.enter_async_context(
                open_client(kind, server, session, session_id)
            )
            for session_id in sessions
            for kind in kinds
        }
        await wait_until(lambda: hub_of(server).subscriber_count == len(streams), "subscribers")
        await asyncio.gather(*(run_workflow(client, session_id) for session_id in sessions))
        results = await asyncio.gather(*(read_to_end(stream) for stream in streams.values()))
    seen = dict(zip(streams, results, strict=True))
    for session_id in sessions:
        assert_workflow_story(seen[session_id, kinds[0]], session_id)
        for kind in kinds[1:]:
            assert stored(seen[session_id, kind]) == stored(seen[session_id, kinds[0]]), kind


# --- many sessions ----------------------------------------------------------------------------


async def test_fifty_sessions_with_several_subscribers_each_get_only_their_own_stream(
    client: AppClient,
) -> None:
    """50 sessions, each watched by WebSocket (two libraries) and SSE subscribers (and
    ``curl -N`` on some), each fed 30 events and a final one through the REST publish
    endpoint, all concurrently: every stream is complete, in order, and holds only its own
    session's events."""
    server, hub = client.server, hub_of(client.server)
    sessions = [new_session_id() for _ in range(50)]
    count = 30

    def kinds_of(index: int) -> tuple[str, ...]:
        return CLIENTS if index < 5 else CLIENTS[:3]

    async def feed(session_id: str) -> list[str]:
        answers = [await publish(client, session_id, progress(n)) for n in range(1, count + 1)]
        answers.append(await publish(client, session_id, final()))
        return [answer["id"] for answer in answers]

    async with subscriber_session() as session, AsyncExitStack() as stack:
        streams: dict[tuple[str, str], EventStream] = {}
        for index, session_id in enumerate(sessions):
            for kind in kinds_of(index):
                streams[session_id, kind] = await stack.enter_async_context(
                    open_client(kind, server, session, session_id)
                )
        await wait_until(lambda: hub.subscriber_count == len(streams), "every subscriber")
        published = await asyncio.gather(*(feed(session_id) for session_id in sessions))
        results = await asyncio.gather(*(read_to_end(stream) for stream in streams.values()))

    published_ids = dict(zip(sessions, published, strict=True))
    for (session_id, kind), events in zip(streams, results, strict=True):
        assert_whole_story(events, session_id, count + 1)
        assert ids(events) == published_ids[session_id], kind
    await wait_until(lambda: hub.subscriber_count == 0, "every subscription to end")


# --- clients that drop ------------------------------------------------------------------------


def footprint(server: BaseTestServer) -> dict[str, float]:
    """What a connection holds on the server: subscriptions, subscribed sessions, the
    connection gauges, and (server and client share the loop) every asyncio task."""
    hub = hub_of(server)
    return {
        "subscribers": hub.subscriber_count,
        "sessions": hub.session_count,
        **connections(server),
        "tasks": len(asyncio.all_tasks()),
    }


@pytest.mark.parametrize("kind", CLIENTS)
async def test_client_that_drops_abruptly_leaves_nothing_behind(
    client: AppClient, kind: str
) -> None:
    """A client whose TCP connection is dropped mid-stream, without a close frame or the
    end of the response (curl: killed), leaves no subscription, session, connection count or
    task behind, and the session streams on for others."""
    server, hub = client.server, hub_of(client.server)
    session_id = new_session_id()
    event = ProgressEvent(session_id=session_id, agent="demand", status="step", progress=1)
    await hub.publish(event)
    async with subscriber_session() as session:
        baseline = footprint(server)
        async with open_client(kind, server, session, session_id) as stream:
            assert seqs(await read_events(stream, 1)) == [1]
            await wait_until(lambda: footprint(server)["subscribers"] == 1, "the subscription")
            transport = "sse" if kind.endswith("sse") else "websocket"
            assert footprint(server)[transport] == baseline[transport] + 1
            if isinstance(stream, CurlSSE):
                stream.process.kill()
            else:
                stream.abort()
        await wait_until(
            lambda: footprint(server) == baseline,
            f"{footprint(server)} to return to {baseline}",
            CLEANUP_TIMEOUT,
        )
    await hub.publish(event)
    async with open_aiohttp_sse(client.session, http_url(server, sse_path(session_id))) as sse:
        assert seqs(await read_events(sse, 2)) == [1, 2]


async def test_many_clients_dropping_at_once_leave_nothing_behind(client: AppClient) -> None:
    """Forty clients of every kind dropping together while events flow leave the hub, the
    gauges and the task count as they were."""
    server, hub = client.server, hub_of(client.server)
    session_id = new_session_id()
    kinds = [kind for kind in CLIENTS[:3] for _ in range(13)]
    # The broker opens its connections (and the Redis broker their reader task) on first
    # use; they are the process's, not the clients', so the baseline is taken after one.
    warm_up = new_session_id()
    await hub.publish(ProgressEvent(session_id=warm_up, agent="demand", status="x", progress=1))
    async with subscriber_session() as session:
        baseline = footprint(server)
        async with AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(open_client(kind, server, session, session_id))
                for kind in kinds
            ]
            await wait_until(lambda: hub.subscriber_count == len(kinds), "every subscriber")
            for n in range(1, 4):
                await hub.publish(
                    ProgressEvent(session_id=session_id, agent="demand", status="x", progress=n)
                )
            await asyncio.gather(*(read_events(stream, 3) for stream in streams))
            for stream in streams:
                stream.abort()
            for n in range(4, 8):
                await hub.publish(
                    ProgressEvent(session_id=session_id, agent="demand", status="x", progress=n)
                )
        await wait_until(
            lambda: footprint(server) == baseline,
            f"{footprint(server)} to return to {baseline}",
            CLEANUP_TIMEOUT,
        )


# --- bad input breaks nothing else ------------------------------------------------------------


async def test_bad_input_from_other_clients_does_not_disturb_a_running_stream(
    make_client: ClientFactory, settings: Settings
) -> None:
    """While well-behaved clients follow a session, others send malformed JSON, wrong types,
    oversized bodies and frames, bad session ids and junk ``Last-Event-ID`` values: each of
    those gets its own error, and the well-behaved clients still get the whole story."""
    client = await make_client(settings)
    server, hub = client.server, hub_of(client.server)
    session_id = new_session_id()
    count = 20

    async def misbehave(session: ClientSession) -> None:
        oversized = b'{"type": "progress", "status": "' + b"x" * settings.max_body_size + b'"}'
        bodies: list[tuple[str, bytes, int]] = [
            (f"/api/sessions/{session_id}/events", b"{not json", 400),
            (f"/api/sessions/{session_id}/events", b'{"type": "progress", "progress": "x"}', 422),
            (f"/api/sessions/{session_id}/events", oversized, 413),
            (f"/api/sessions/{session_id}/events", b'{"type": "heartbeat"}', 422),
            ("/api/sessions/bad%2Fid/events", b"{}", 400),
            ("/api/orchestrator/run-workflow", b'{"strategy_description": 1}', 422),
        ]
        for path, body, status in bodies:
            headers = {"Content-Type": "application/json"}
            async with session.post(http_url(server, path), data=body, headers=headers) as r:
                assert r.status == status, (path, await r.text())
        for junk in ("-", "1-1-1", "-7", "\u00e9-1", "z" * 3000):
            headers = {"Last-Event-ID": junk}
            async with open_aiohttp_sse(
                session, http_url(server, sse_path(session_id)), headers
            ) as sse:
                first = await read_events(sse, 1)
                assert is_control_error(first[0], "replay_gap"), first
        async with open_aiohttp_sse(session, http_url(server, sse_path("x%00y"))) as sse:
            assert sse.status == 400
        async with open_websockets_ws(ws_url(server, ws_path("tiny"))) as ws:
            assert is_control_error((await read_events(ws, 1))[0], "invalid_session_id")
        async with open_aiohttp_ws(session, ws_url(server, ws_path(session_id))) as ws:
            await ws.send_text("{]")
            await ws.send_bytes(b"\x00")
            for _ in range(2):
                notice = await read_until(ws, lambda event: "id" not in event)
                assert is_control_error(notice[-1], "invalid_message"), notice
            await ws.send_text("x" * (settings.max_frame_size + 1))
            await read_to_end(ws)
            assert ws.close_code == 1009

    async with subscriber_session() as session, AsyncExitStack() as stack:
        followers = [
            await stack.enter_async_context(open_client(kind, server, session, session_id))
            for kind in CLIENTS
        ]
        await wait_until(lambda: hub.subscriber_count == len(followers), "followers")

        async def feed() -> None:
            for n in range(1, count + 1):
                await publish(client, session_id, progress(n))
            # The final event waits for the misbehaviour: a replay must not end its stream.

        await asyncio.gather(feed(), misbehave(session))
        await publish(client, session_id, final())
        results = await asyncio.gather(*(read_to_end(stream) for stream in followers))
    for kind, events in zip(CLIENTS, results, strict=True):
        assert events == stored(events), kind
        assert_whole_story(events, session_id, count + 1)
