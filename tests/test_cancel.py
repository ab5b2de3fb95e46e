"""Cancelling a workflow (``POST /api/sessions/{id}/cancel``), on both brokers, over real
sockets: every subscriber gets the final ``workflow_cancelled`` error and the end of its
stream, the work itself stops, and a second cancel is answered as the first. What cannot
be cancelled gets a clear 404 or 409, and tokens guard it as they guard watching.

Across real processes: tests/multiprocess/test_cluster.py."""

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
from server.auth import issue_stream_token
from server.config import Settings
from server.context import STREAM_CONTEXT
from tests.clients import (
    Event,
    app_of,
    final,
    http_url,
    metric,
    new_session_id,
    open_aiohttp_ws,
    open_curl_sse,
    progress,
    read_to_end,
    read_until,
    stored,
    wait_until,
    ws_url,
)
from tests.conftest import BOTH_BROKERS
from tests.hardening.support import FakeAgents, RawConnection
from tests.test_contract import openapi_validate, openapi_validator
from tests.timing import EVENT_TIMEOUT

STRATEGY = "15% off outdoor furniture for 8 weeks"
SECRET = "cancel-test-secret-0123456789"

StartServer = Callable[..., Awaitable[BaseTestServer]]


@pytest.fixture
def agents() -> FakeAgents:
    agents = FakeAgents()
    agents.gate = asyncio.Event()  # the demand agent runs until the test ends
    return agents


@pytest.fixture
async def start(
    aiohttp_server: Callable[..., Awaitable[BaseTestServer]], settings: Settings, agents: FakeAgents
) -> StartServer:
    async def factory(**changes: Any) -> BaseTestServer:
        return await aiohttp_server(create_app(settings.replace(**changes), agents=agents))

    return factory


async def answer(response: Any) -> tuple[int, dict[str, Any]]:
    async with response:
        body: dict[str, Any] = json.loads(await response.text())
        return response.status, body


async def cancel(
    http: ClientSession, server: BaseTestServer, session_id: str, query: str = ""
) -> tuple[int, dict[str, Any]]:
    return await answer(
        await http.post(http_url(server, f"/api/sessions/{session_id}/cancel{query}"))
    )


async def run_and_wait(
    http: ClientSession, server: BaseTestServer, session_id: str
) -> tuple[int, dict[str, Any]]:
    """``run-workflow?wait=true``: the status and body once the workflow has ended."""
    url = http_url(server, "/api/orchestrator/run-workflow?wait=true")
    body = {"strategy_description": STRATEGY, "session_id": session_id}
    return await answer(await http.post(url, json=body))


def demand_started(event: Event) -> bool:
    return event.get("agent") == "demand" and event.get("progress") == 10


def is_cancelled(event: Event) -> bool:
    return (event["type"], event.get("code"), event.get("agent"), event.get("final")) == (
        "error",
        "workflow_cancelled",
        "orchestrator",
        True,
    )


@BOTH_BROKERS
async def test_a_cancelled_workflow_ends_every_stream_and_its_work_stops(
    start: StartServer, agents: FakeAgents
) -> None:
    """Mid-workflow, a cancel: 200; the WebSocket and ``curl -N`` subscribers get the same
    final ``workflow_cancelled`` error and the end of their stream (1000); the running
    agent is cancelled; ``?wait=true`` is answered ``failed`` with that code; the snapshot
    says so; the run is counted as cancelled and its slot and lease are freed. Sent
    again, the cancel gets the same answer and stores nothing."""
    server = await start()
    session_id = new_session_id()
    async with (
        ClientSession() as http,
        open_aiohttp_ws(http, ws_url(server, f"/ws/orchestrator/{session_id}")) as ws,
        open_curl_sse(http_url(server, f"/sse/orchestrator/{session_id}")) as sse,
    ):
        waiting = asyncio.create_task(run_and_wait(http, server, session_id))
        before = await read_until(ws, demand_started)
        status, body = await cancel(http, server, session_id)
        assert (status, body) == (200, {"session_id": session_id, "status": "cancelled"})
        openapi_validate(openapi_validator(), "WorkflowCancelled", body)

        rest_ws, rest_sse = await asyncio.gather(
            read_to_end(ws, EVENT_TIMEOUT), read_to_end(sse, EVENT_TIMEOUT)
        )
        assert ws.ws.close_code == 1000
        story = stored(before + rest_ws)
        assert stored(rest_sse)[-1] == story[-1]
        assert is_cancelled(story[-1]), story[-1]
        assert story[-1]["error"] == "The forecast was cancelled." and story[-1]["details"] == ""
        assert not any(event.get("final") for event in story[:-1])

        await asyncio.wait_for(agents.stopped.wait(), EVENT_TIMEOUT)
        status, outcome = await asyncio.wait_for(waiting, EVENT_TIMEOUT)
        assert status == 200 and outcome["status"] == "failed" and outcome["result"] is None
        assert outcome["error"] == {
            "code": "workflow_cancelled",
            "error": "The forecast was cancelled.",
        }
        openapi_validate(openapi_validator(), "RunWorkflowOutcome", outcome)

        status, snapshot = await answer(
            await http.get(http_url(server, f"/api/sessions/{session_id}"))
        )
        assert status == 200 and snapshot["state"] == "failed"
        assert snapshot["error"]["code"] == "workflow_cancelled"
        assert snapshot["last_seq"] == story[-1]["seq"]
        assert snapshot["agents"]["demand"]["state"] == "stopped"  # it was cancelled
        assert snapshot["agents"]["extraction"]["state"] == "complete"
        openapi_validate(openapi_validator(), "SessionSnapshot", snapshot)

        assert await cancel(http, server, session_id) == (200, body)
        status, again = await answer(
            await http.get(http_url(server, f"/api/sessions/{session_id}"))
        )
        assert again["last_seq"] == snapshot["last_seq"]  # nothing stored by the second cancel

    runner = app_of(server)[WORKFLOW_RUNNER]
    assert runner.running == 0 and not runner.leases.holds(session_id)
    assert metric(server, "orchestrator_workflows_total", outcome="cancelled") == 1
    assert metric(server, "orchestrator_workflows_total", outcome="interrupted") == 0


@BOTH_BROKERS
async def test_what_cannot_be_cancelled_gets_a_clear_error(start: StartServer) -> None:
    """404 for a session that does not exist; 400 for an id that is not one; 409
    ``no_workflow`` for a session only services publish into, ``session_ended`` once
    they ended it. Each a JSON error of the usual shape."""
    server = await start()
    async with ClientSession() as http:
        status, body = await cancel(http, server, new_session_id())
        assert (status, body["code"]) == (404, "session_not_found")
        status, body = await cancel(http, server, "short")
        assert (status, body["code"]) == (400, "invalid_session_id")

        published = new_session_id()
        response = await http.post(
            http_url(server, f"/api/sessions/{published}/events"), json=progress(1)
        )
        assert response.status == 202
        status, body = await cancel(http, server, published)
        assert (status, body["code"]) == (409, "no_workflow")
        openapi_validate(openapi_validator(), "Error", body)
        assert set(body) == {"error", "code", "reference"}

        finished = new_session_id()
        for event in (progress(1), final()):
            await http.post(http_url(server, f"/api/sessions/{finished}/events"), json=event)
        status, body = await cancel(http, server, finished)
        assert (status, body["code"]) == (409, "session_ended")


@BOTH_BROKERS
async def test_a_finished_workflow_cannot_be_cancelled(
    start: StartServer, agents: FakeAgents
) -> None:
    """A workflow that completed: 409 ``session_ended``, and its story keeps its
    ``complete`` as the final event."""
    agents.gate = None  # runs through
    server = await start()
    session_id = new_session_id()
    async with ClientSession() as http:
        status, outcome = await run_and_wait(http, server, session_id)
        assert (status, outcome["status"]) == (200, "complete")
        status, body = await cancel(http, server, session_id)
        assert (status, body["code"]) == (409, "session_ended")
        status, snapshot = await answer(
            await http.get(http_url(server, f"/api/sessions/{session_id}"))
        )
        assert snapshot["state"] == "complete"
    assert metric(server, "orchestrator_workflows_total", outcome="cancelled") == 0


@BOTH_BROKERS
async def test_with_stream_tokens_only_the_workflows_token_cancels_it(
    start: StartServer, agents: FakeAgents
) -> None:
    """With stream tokens on, a cancel without a token, or with another session's, is
    401 and cancels nothing; with the token ``run-workflow`` answered, it cancels."""
    server = await start(stream_token_secret=SECRET)
    async with ClientSession() as http:
        status, started = await answer(
            await http.post(
                http_url(server, "/api/orchestrator/run-workflow"),
                json={"strategy_description": STRATEGY},
            )
        )
        assert status == 202
        session_id, token = started["session_id"], started["token"]
        other = issue_stream_token(SECRET, new_session_id(), 60)
        for query in ("", f"?token={other}", "?token=forged"):
            status, body = await cancel(http, server, session_id, query)
            assert (status, body["code"]) == (401, "unauthorized"), query
        assert app_of(server)[WORKFLOW_RUNNER].running == 1
        assert await cancel(http, server, session_id, f"?token={token}") == (
            200,
            {"session_id": session_id, "status": "cancelled"},
        )
    runner = app_of(server)[WORKFLOW_RUNNER]
    await wait_until(lambda: runner.running == 0, "the cancelled workflow to stop")


SERVICE_ENDS = {
    "error": {
        "type": "error",
        "agent": "billing",
        "code": "quota_exceeded",
        "error": "Your plan's forecasts are used up.",
        "details": "",
        "final": True,
    },
    "complete": {
        "type": "complete",
        "agent": "billing",
        "status": "Forecast bought elsewhere",
        "data": {"result": {"units": 120}},
        "final": True,
    },
}


@BOTH_BROKERS
@pytest.mark.parametrize("ending", SERVICE_ENDS)
async def test_a_final_event_from_a_service_stops_the_running_workflow(
    start: StartServer, agents: FakeAgents, ending: str
) -> None:
    """A service ends a running workflow's session with its own final event, through the
    workflow's own process: the work stops at once, as for a cancel (the lease, renewed
    every 20 s here, plays no part), and ``?wait=true`` is answered with what subscribers
    saw (its ``error``, or its ``complete`` and result), counted as interrupted."""
    server = await start(lease_ttl=60.0)
    session_id = new_session_id()
    async with ClientSession() as http:
        waiting = asyncio.create_task(run_and_wait(http, server, session_id))
        # At the demand agent's gate, whose wait the stop cancels (stopping the workflow
        # any earlier would end it before that agent began, and `stopped` would not be set).
        await asyncio.wait_for(agents.started.wait(), EVENT_TIMEOUT)
        ended = SERVICE_ENDS[ending]
        response = await http.post(
            http_url(server, f"/api/sessions/{session_id}/events"), json=ended
        )
        assert response.status == 202
        await asyncio.wait_for(agents.stopped.wait(), EVENT_TIMEOUT)
        status, outcome = await asyncio.wait_for(waiting, EVENT_TIMEOUT)
    assert status == 200
    if ending == "error":
        assert outcome["status"] == "failed"
        assert outcome["error"] == {"code": ended["code"], "error": ended["error"]}
    else:
        assert (outcome["status"], outcome["result"]) == ("complete", {"units": 120})
    assert metric(server, "orchestrator_workflows_total", outcome="interrupted") == 1


@BOTH_BROKERS
async def test_a_service_final_event_sent_again_stops_the_workflow_its_first_did_not(
    start: StartServer, agents: FakeAgents, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service's final event is stored, but its request ends before it can stop the
    running workflow (its client hung up: the handler is cancelled). The service sends it
    again with the same ``Idempotency-Key``: the retry is answered as the first
    (``Idempotent-Replayed``), and stops the work at once."""
    server = await start(lease_ttl=60.0)
    session_id = new_session_id()
    runner = app_of(server)[WORKFLOW_RUNNER]
    async with ClientSession() as http:
        waiting = asyncio.create_task(run_and_wait(http, server, session_id))
        await asyncio.wait_for(agents.started.wait(), EVENT_TIMEOUT)  # at its gate
        url = http_url(server, f"/api/sessions/{session_id}/events")
        headers = {"Idempotency-Key": "final-1"}
        with monkeypatch.context() as patch:
            patch.setattr(runner, "ended", lambda final: None)  # the first request stops short
            async with http.post(url, json=SERVICE_ENDS["error"], headers=headers) as first:
                assert first.status == 202
        assert not agents.stopped.is_set()
        async with http.post(url, json=SERVICE_ENDS["error"], headers=headers) as again:
            assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
        await asyncio.wait_for(agents.stopped.wait(), EVENT_TIMEOUT)
        status, outcome = await asyncio.wait_for(waiting, EVENT_TIMEOUT)
    assert (status, outcome["error"]["code"]) == (200, SERVICE_ENDS["error"]["code"])


def noted(monkeypatch: pytest.MonkeyPatch, owner: object, method: str) -> asyncio.Event:
    """An event set when ``owner.method`` (a coroutine method) is called, which goes on
    as before."""
    called = asyncio.Event()
    original = getattr(owner, method)

    async def noting(*args: Any) -> Any:
        called.set()
        return await original(*args)

    monkeypatch.setattr(owner, method, noting)
    return called


async def post_and_hang_up_while_redis_writes(
    server: BaseTestServer, redis: Redis, path: str, body: Any, writing: asyncio.Event
) -> None:
    """POST ``body`` to ``path`` while Redis holds every write back, hang up once the
    handler is ``writing`` (the handler is cancelled, as for any client that goes), and
    let Redis write once the handler has ended."""
    assert server.runner is not None
    handlers = server.runner.server
    assert handlers is not None
    await redis.client_pause(10_000, all=False)
    try:
        client = await RawConnection.open(server)
        client.post(path, body)
        await asyncio.wait_for(writing.wait(), EVENT_TIMEOUT)
        before = len(handlers.connections)
        client.abort()
        await wait_until(lambda: len(handlers.connections) < before, "the handler to end")
    finally:
        await redis.client_unpause()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client of the tests' Redis, for the Redis-only tests."""
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


STOPPING_REQUESTS = {
    "a service's final event": ("events", SERVICE_ENDS["error"], SERVICE_ENDS["error"]["code"]),
    "a cancel": ("cancel", {}, "workflow_cancelled"),
}


@pytest.mark.parametrize("broker_kind", ["redis"])  # the in-memory store answers at once
@pytest.mark.parametrize("request_kind", list(STOPPING_REQUESTS))
async def test_a_stop_whose_client_hangs_up_while_it_is_stored_still_stops_the_workflow(
    start: StartServer,
    agents: FakeAgents,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    request_kind: str,
) -> None:
    """A service sends its final event, or a user cancels and closes the page, and the
    client hangs up while Redis is storing it (its handler is cancelled): the event is
    stored, and the running workflow stops at once, as if the client had waited for its
    answer; not at a lease renewal, a minute on."""
    endpoint, body, code = STOPPING_REQUESTS[request_kind]
    server = await start(lease_ttl=60.0)
    session_id = new_session_id()
    publishing = noted(monkeypatch, app_of(server)[STREAM_CONTEXT].hub, "publish")
    async with ClientSession() as http:
        waiting = asyncio.create_task(run_and_wait(http, server, session_id))
        await asyncio.wait_for(agents.started.wait(), EVENT_TIMEOUT)  # at its gate
        path = f"/api/sessions/{session_id}/{endpoint}"
        await post_and_hang_up_while_redis_writes(server, redis, path, body, publishing)
        await asyncio.wait_for(agents.stopped.wait(), EVENT_TIMEOUT)
        status, outcome = await asyncio.wait_for(waiting, EVENT_TIMEOUT)
    assert (status, outcome["error"]["code"]) == (200, code)


@pytest.mark.parametrize("broker_kind", ["redis"])  # the in-memory store answers at once
async def test_a_publish_that_fails_after_its_service_hung_up_is_logged(
    start: StartServer,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A final event whose service hung up while Redis was writing, and which then fails
    (its session had ended): nobody is left to answer, so the log says it."""
    server = await start()
    session_id = new_session_id()
    path = f"/api/sessions/{session_id}/events"
    async with ClientSession() as http:
        async with http.post(http_url(server, path), json=SERVICE_ENDS["complete"]) as response:
            assert response.status == 202
    publishing = noted(monkeypatch, app_of(server)[STREAM_CONTEXT].hub, "publish")
    ending = SERVICE_ENDS["error"]
    await post_and_hang_up_while_redis_writes(server, redis, path, ending, publishing)
    await wait_until(
        lambda: any("after its client hung up" in r.getMessage() for r in caplog.records),
        "the failure to be logged",
    )
    (logged,) = [r for r in caplog.records if "after its client hung up" in r.getMessage()]
    assert logged.levelname == "WARNING" and "ended" in logged.getMessage(), logged.getMessage()


@pytest.mark.parametrize("broker_kind", ["redis"])  # the in-memory store answers at once
async def test_a_client_that_hangs_up_while_its_session_is_claimed_still_has_it_run(
    start: StartServer, agents: FakeAgents, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client asks for a run and hangs up while Redis is claiming its session (its
    handler is cancelled): the session is claimed, and its workflow runs and ends as if
    the client had waited for its answer, which its stream would show. It is not left
    claimed with nothing running it, for a lease monitor to end as interrupted."""
    server = await start()
    session_id = new_session_id()
    ctx = app_of(server)[STREAM_CONTEXT]
    claiming = noted(monkeypatch, ctx.hub.broker, "claim")
    await post_and_hang_up_while_redis_writes(
        server,
        redis,
        "/api/orchestrator/run-workflow",
        {"strategy_description": STRATEGY, "session_id": session_id},
        claiming,
    )
    await asyncio.wait_for(agents.started.wait(), EVENT_TIMEOUT)
    assert agents.gate is not None
    agents.gate.set()
    await wait_until(lambda: ctx.admission.sessions == 0, "the run to end, and its place freed")
    async with (
        ClientSession() as http,
        http.get(http_url(server, f"/api/sessions/{session_id}")) as response,
    ):
        assert (await response.json())["state"] == "complete"


@pytest.mark.parametrize("broker_kind", ["redis"])  # the in-memory store never loses one
async def test_a_running_workflow_whose_session_the_store_lost_can_still_be_cancelled(
    start: StartServer, agents: FakeAgents, settings: Settings, redis: Redis
) -> None:
    """Redis loses a running workflow's keys (restarted empty, say). Before the next
    renewal takes its lease again, a cancel through its own process is still a cancel:
    200, a final ``workflow_cancelled`` stored, and the work stopped; not a 404 or a
    409 ``no_workflow``."""
    server = await start(lease_ttl=60.0)  # no renewal during the test
    session_id = new_session_id()
    async with ClientSession() as http:
        response = await http.post(
            http_url(server, "/api/orchestrator/run-workflow"),
            json={"strategy_description": STRATEGY, "session_id": session_id},
        )
        assert response.status == 202
        await asyncio.wait_for(agents.started.wait(), EVENT_TIMEOUT)
        keys = await redis.keys(f"{settings.redis_key_prefix}:{{{session_id}}}:*")
        assert keys and await redis.delete(*keys) == len(keys)
        status, body = await cancel(http, server, session_id)
        assert (status, body) == (200, {"session_id": session_id, "status": "cancelled"})
        await asyncio.wait_for(agents.stopped.wait(), EVENT_TIMEOUT)
        status, snapshot = await answer(
            await http.get(http_url(server, f"/api/sessions/{session_id}"))
        )
    assert snapshot["state"] == "failed" and snapshot["error"]["code"] == "workflow_cancelled"
