"""Limits: each one refuses with its own code, in the JSON error shape, and nothing else
degrades (the streams already open keep streaming, and a freed place is reusable)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import BaseTestServer

from server.errors import ServiceUnavailable
from server.messages import ProgressEvent
from tests.hardening.clients import (
    assert_error_body,
    next_event,
    refused_ws,
    sse_url,
    url,
    ws_url,
)
from tests.hardening.conftest import StartServer
from tests.hardening.support import (
    FakeAgents,
    context_of,
    metric,
    new_session_id,
    open_connections,
    wait_until,
)
from tests.timing import EVENT_TIMEOUT

TRY_AGAIN_LATER = 1013
MESSAGE_TOO_BIG = 1009
# aiohttp reads what still comes of an unread body this long before it closes the socket.
AIOHTTP_LINGERING_TIME = 10.0


def progress(session_id: str, n: int = 1) -> ProgressEvent:
    return ProgressEvent(session_id=session_id, agent="demand", status=f"step {n}", progress=n)


async def assert_sse_overloaded(http: ClientSession, target: str) -> None:
    async with http.get(target) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) > 0
        assert_error_body(await response.json(), "overloaded")


async def test_streams_over_the_total_limit_get_1013_or_503_and_open_ones_keep_streaming(
    start: StartServer, http: ClientSession
) -> None:
    """At ``max_connections`` a WebSocket gets ``overloaded`` then 1013 and SSE gets 503 with
    ``Retry-After``; the open streams still get their events; a freed place is taken again."""
    server = await start(max_connections=2)
    ctx = context_of(server)
    first, second = new_session_id(), new_session_id()
    async with (
        http.ws_connect(ws_url(server, first)) as ws,
        http.get(sse_url(server, second)) as sse,
    ):
        assert await sse.content.readline() == b"retry: 2000\n"
        await wait_until(lambda: open_connections(ctx) == 2)

        notice, code = await refused_ws(http, ws_url(server, new_session_id()))
        assert code == TRY_AGAIN_LATER
        assert notice is not None and notice["type"] == "error" and notice["code"] == "overloaded"
        assert "id" not in notice  # a control event: never stored
        await assert_sse_overloaded(http, sse_url(server, new_session_id()))
        assert metric(ctx, "orchestrator_refusals_total", reason="connections") == 2

        await ctx.hub.publish(progress(first))
        event = await next_event(ws)
        assert event is not None and event["seq"] == 1
    await wait_until(lambda: open_connections(ctx) == 0)
    async with http.ws_connect(ws_url(server, new_session_id())):
        await wait_until(lambda: open_connections(ctx) == 1)


async def test_streams_of_one_session_over_its_limit_are_refused_others_are_not(
    start: StartServer, http: ClientSession
) -> None:
    """At ``max_connections_per_session`` that session's next stream is refused (1013, 503);
    another session's stream is admitted."""
    server = await start(max_connections_per_session=2)
    ctx = context_of(server)
    busy = new_session_id()
    async with http.ws_connect(ws_url(server, busy)), http.ws_connect(ws_url(server, busy)):
        await wait_until(lambda: open_connections(ctx) == 2)
        notice, code = await refused_ws(http, ws_url(server, busy))
        assert code == TRY_AGAIN_LATER and notice is not None and notice["code"] == "overloaded"
        await assert_sse_overloaded(http, sse_url(server, busy))
        assert metric(ctx, "orchestrator_refusals_total", reason="session_connections") == 2
        async with http.ws_connect(ws_url(server, new_session_id())) as other:
            await wait_until(lambda: open_connections(ctx) == 3)
            assert not other.closed


async def test_a_new_session_over_max_sessions_is_refused_a_live_one_is_not(
    start: StartServer, http: ClientSession
) -> None:
    """At ``max_sessions`` live sessions, a stream or workflow of a new session is refused
    (1013, 503 with ``Retry-After``), while another stream of a live session is admitted."""
    server = await start(max_sessions=2)
    ctx = context_of(server)
    first, second = new_session_id(), new_session_id()
    async with http.ws_connect(ws_url(server, first)), http.get(sse_url(server, second)) as sse:
        await sse.content.readline()
        await wait_until(lambda: metric(ctx, "orchestrator_sessions", state="live") == 2)

        notice, code = await refused_ws(http, ws_url(server, new_session_id()))
        assert code == TRY_AGAIN_LATER and notice is not None and notice["code"] == "overloaded"
        async with http.post(
            url(server, "/api/orchestrator/run-workflow"),
            json={"strategy_description": "10% off chairs"},
        ) as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) > 0
            assert_error_body(await response.json(), "overloaded")
        assert metric(ctx, "orchestrator_refusals_total", reason="sessions") == 2

        async with http.ws_connect(ws_url(server, first)):  # the same, live session
            await wait_until(lambda: open_connections(ctx) == 3)
    await wait_until(lambda: metric(ctx, "orchestrator_sessions", state="live") == 0)
    async with http.ws_connect(ws_url(server, new_session_id())):
        await wait_until(lambda: open_connections(ctx) == 1)


async def test_at_max_sessions_a_session_that_already_exists_still_gets_409(
    start: StartServer, http: ClientSession
) -> None:
    """At ``max_sessions``, run-workflow for a session that exists (ended, or one services
    publish into) is ``409 session_exists`` as at any load, not a 503 that would have its
    client retry what can never succeed; a new session gets the 503."""
    server = await start(max_sessions=1)
    ctx = context_of(server)
    ended, serviced = new_session_id(), new_session_id()
    for session_id, event in (
        (ended, {"type": "complete", "agent": "crawler", "final": True}),
        (serviced, {"type": "progress", "agent": "crawler", "status": "s", "progress": 1}),
    ):
        async with http.post(url(server, f"/api/sessions/{session_id}/events"), json=event) as r:
            assert r.status == 202
    async with http.ws_connect(ws_url(server, new_session_id())):
        await wait_until(lambda: metric(ctx, "orchestrator_sessions", state="live") == 1)
        for session_id, status, code in (
            (ended, 409, "session_exists"),
            (serviced, 409, "session_exists"),
            (new_session_id(), 503, "overloaded"),
        ):
            async with http.post(
                url(server, "/api/orchestrator/run-workflow"),
                json={"strategy_description": "10% off chairs", "session_id": session_id},
            ) as response:
                assert response.status == status
                assert_error_body(await response.json(), code)
        assert metric(ctx, "orchestrator_refusals_total", reason="sessions") == 1


async def test_at_max_sessions_a_refusal_costs_no_store_call_it_does_not_need(
    start: StartServer, http: ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At ``max_sessions`` a run-workflow with no session id (a new one is made) is
    refused at once, asking the event store nothing; with an id, the store is asked
    whether it exists, and if it cannot say, the answer is still the ``overloaded`` 503
    (counted as such), not the store's ``service_unavailable``."""
    server = await start(max_sessions=1)
    ctx = context_of(server)
    asked: list[str] = []

    async def unavailable(session_id: str) -> None:
        asked.append(session_id)
        raise ServiceUnavailable("down")

    monkeypatch.setattr(ctx.hub.broker, "info", unavailable)
    async with http.ws_connect(ws_url(server, new_session_id())):
        await wait_until(lambda: metric(ctx, "orchestrator_sessions", state="live") == 1)
        given = new_session_id()
        for run in ({}, {"session_id": given}):
            async with http.post(
                url(server, "/api/orchestrator/run-workflow"),
                json={"strategy_description": "10% off chairs", **run},
            ) as response:
                assert response.status == 503
                assert_error_body(await response.json(), "overloaded")
        assert asked == [given]
        assert metric(ctx, "orchestrator_refusals_total", reason="sessions") == 2


async def test_a_running_workflow_keeps_its_session_live_until_it_ends(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> None:
    """A running workflow counts as a live session: with ``max_sessions=1`` a stream of
    another session is refused, one of the running session is admitted; once the workflow
    has ended its place is free."""
    agents.gate = asyncio.Event()
    server = await start(max_sessions=1)
    ctx = context_of(server)
    running = new_session_id()
    async with http.post(
        url(server, "/api/orchestrator/run-workflow"),
        json={"strategy_description": "10% off chairs", "session_id": running},
    ) as response:
        assert response.status == 202
    notice, code = await refused_ws(http, ws_url(server, new_session_id()))
    assert code == TRY_AGAIN_LATER and notice is not None and notice["code"] == "overloaded"

    async with http.ws_connect(ws_url(server, running)) as ws:
        agents.gate.set()
        events = []
        while (event := await next_event(ws)) is not None:
            events.append(event)
        assert events[-1]["final"] is True and events[-1]["type"] == "complete"
    await wait_until(lambda: metric(ctx, "orchestrator_sessions", state="live") == 0)
    async with http.ws_connect(ws_url(server, new_session_id())):
        await wait_until(lambda: open_connections(ctx) == 1)


async def test_a_frame_over_max_frame_size_closes_1009_and_other_streams_go_on(
    start: StartServer, http: ClientSession
) -> None:
    """A client frame larger than ``max_frame_size`` closes that WebSocket with 1009 and is
    counted; another connection of the same session keeps streaming."""
    server = await start(max_frame_size=1024)
    ctx = context_of(server)
    session_id = new_session_id()
    async with http.ws_connect(ws_url(server, session_id)) as calm:
        async with http.ws_connect(ws_url(server, session_id)) as loud:
            await loud.send_str("x" * 1025)
            assert await next_event(loud) is None
            assert loud.close_code == MESSAGE_TOO_BIG
        await wait_until(
            lambda: metric(ctx, "orchestrator_refusals_total", reason="frame_too_large") == 1
        )
        await ctx.hub.publish(progress(session_id))
        event = await next_event(calm)
        assert event is not None and event["seq"] == 1


async def assert_a_publish_is_served(http: ClientSession, server: BaseTestServer) -> None:
    """A normal request right after a refusal is served: the refusal left nothing behind."""
    async with http.post(
        url(server, f"/api/sessions/{new_session_id()}/events"),
        json={"type": "progress", "agent": "demand", "status": "ok", "progress": 1},
    ) as response:
        assert response.status == 202


async def test_a_body_over_max_body_size_gets_413_in_the_json_error_shape(
    start: StartServer, http: ClientSession
) -> None:
    """Both POST endpoints answer a body over ``max_body_size`` with 413 and the JSON error
    shape (code ``payload_too_large``); a normal request right after is served."""
    server = await start(max_body_size=2048)
    ctx = context_of(server)
    big = b'{"strategy_description": "' + b"x" * 4096 + b'"}'
    for path in ("/api/orchestrator/run-workflow", f"/api/sessions/{new_session_id()}/events"):
        async with http.post(
            url(server, path), data=big, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 413
            assert response.content_type == "application/json"
            assert_error_body(await response.json(), "payload_too_large")
    assert metric(ctx, "orchestrator_refusals_total", reason="payload_too_large") == 2
    await assert_a_publish_is_served(http, server)


async def test_a_body_that_stops_arriving_gets_408_and_its_connection_closed(
    start: StartServer, http: ClientSession
) -> None:
    """A client that sends its headers and part of a body, then nothing: after
    ``body_timeout`` both POST endpoints answer 408 ``request_timeout`` in the JSON error
    shape with ``Connection: close``, and close the connection once aiohttp's lingering
    read of what may still come (10 s) is over, where it was held for as long as the
    client liked. Each is counted as a refusal; a normal request right after is served."""
    server = await start(body_timeout=0.3)
    ctx = context_of(server)

    async def stall(path: str) -> None:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"str'.encode()
        )
        async with asyncio.timeout(AIOHTTP_LINGERING_TIME + EVENT_TIMEOUT):
            answer = await reader.read()  # to the end: the server closes the connection
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b"Connection: close" in head
        assert_error_body(json.loads(body), "request_timeout")

    paths = ("/api/orchestrator/run-workflow", f"/api/sessions/{new_session_id()}/events")
    await asyncio.gather(*(stall(path) for path in paths))
    assert metric(ctx, "orchestrator_refusals_total", reason="request_timeout") == 2
    await assert_a_publish_is_served(http, server)


async def test_a_strategy_over_max_strategy_length_gets_422_in_the_json_error_shape(
    start: StartServer, http: ClientSession
) -> None:
    """A ``strategy_description`` longer than ``max_strategy_length`` is refused with 422
    and counted; no workflow starts."""
    server = await start(max_strategy_length=100)
    ctx = context_of(server)
    async with http.post(
        url(server, "/api/orchestrator/run-workflow"),
        json={"strategy_description": "x" * 101},
    ) as response:
        assert response.status == 422
        assert_error_body(await response.json(), "invalid_request")
    assert metric(ctx, "orchestrator_refusals_total", reason="strategy_too_long") == 1
    assert metric(ctx, "orchestrator_sessions", state="running") == 0
