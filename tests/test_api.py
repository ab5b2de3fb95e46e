"""The REST API over a real socket (PROTOCOL.md "Endpoints", "Starting the workflow",
"Publishing from other services"): bodies, status codes, validation, auth, health, metrics,
and error bodies that leak nothing; on both brokers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import BaseTestServer
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from server.app import create_app
from server.brokers.memory import MemoryBroker
from server.config import Settings
from server.messages import CONTROL_ERROR_CODES
from tests.clients import (
    AGENTS,
    STRATEGY,
    AppClient,
    Event,
    final,
    http_url,
    new_session_id,
    open_aiohttp_sse,
    open_aiohttp_ws,
    progress,
    publish,
    read_events,
    read_to_end,
    seqs,
    wait_until,
    ws_url,
)
from tests.conftest import BOTH_BROKERS, ClientFactory, hub_of
from tests.test_contract import openapi_validate, openapi_validator
from tests.timing import WORKFLOW_TIMEOUT

pytestmark = BOTH_BROKERS  # every test runs on the in-memory broker and on Redis

RUN = "/api/orchestrator/run-workflow"
LEAKS = (
    "Traceback",
    'File "',
    "/work",
    "site-packages",
    "Error:",
    "ValidationError",
    "JSONDecodeError",
    "UnicodeDecodeError",
    "RecursionError",
    "LookupError",
    "ValueError",
    "TypeError",
    "KeyError",
    "HTTPRequestEntityTooLarge",
    "pydantic",
)


def events_path(session_id: str) -> str:
    return f"/api/sessions/{session_id}/events"


async def error_of(response: Any, status: int, code: str | None = None) -> dict[str, str]:
    """Check an error response: the status, a JSON body of exactly ``error``, ``code`` and
    ``reference``, with nothing of the server's internals in it; return the body."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json"
    body: dict[str, str] = json.loads(text)
    assert set(body) == {"error", "code", "reference"}, body
    assert all(isinstance(value, str) and value for value in body.values()), body
    if code is not None:
        assert body["code"] == code, body
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaked into {text}"
    return body


# --- run-workflow -----------------------------------------------------------------------------


async def test_run_workflow_answers_202_with_the_session_and_its_stream_urls(
    client: AppClient,
) -> None:
    """``run-workflow`` answers 202 with the session id, ``running`` and the two stream URLs,
    and the WebSocket URL it names streams that workflow to its final event."""
    response = await client.post(RUN, json={"strategy_description": STRATEGY})
    assert response.status == 202
    body = await response.json()
    session_id = body["session_id"]
    assert body == {
        "session_id": session_id,
        "status": "running",
        "stream": {
            "websocket": f"/ws/orchestrator/{session_id}",
            "sse": f"/sse/orchestrator/{session_id}",
        },
    }
    async with open_aiohttp_ws(
        client.session, ws_url(client.server, body["stream"]["websocket"])
    ) as ws:
        events = await read_to_end(ws, WORKFLOW_TIMEOUT)
    assert events[-1]["type"] == "complete" and events[-1]["final"] is True
    assert {event["session_id"] for event in events} == {session_id}


async def test_run_workflow_keeps_the_session_id_it_is_given(client: AppClient) -> None:
    """A client-chosen ``session_id`` is the session's id, and its stream URLs use it (the
    frontend opens its stream before it starts the workflow)."""
    session_id = new_session_id()
    async with open_aiohttp_sse(
        client.session, http_url(client.server, f"/sse/orchestrator/{session_id}")
    ) as sse:
        response = await client.post(
            RUN, json={"strategy_description": STRATEGY, "session_id": session_id}
        )
        assert response.status == 202
        body = await response.json()
        assert body["session_id"] == session_id
        assert body["stream"]["sse"] == f"/sse/orchestrator/{session_id}"
        [first] = await read_events(sse, 1)
        assert first["session_id"] == session_id and first["seq"] == 1
    # Teardown interrupts the workflow; it ends with a final error, which is fine here.


async def test_run_workflow_with_wait_returns_the_result_and_a_second_run_is_409(
    client: AppClient,
) -> None:
    """``?wait=true`` answers 200 once the workflow ended, with ``complete`` and a result
    holding the parameters, forecast, inventory and pricing; running the same session again
    is refused with 409."""
    session_id = new_session_id()
    request = {"strategy_description": STRATEGY, "session_id": session_id}
    response = await client.post(RUN + "?wait=true", json=request)
    assert response.status == 200
    body = await response.json()
    assert body["session_id"] == session_id
    assert body["status"] == "complete"
    assert {"parameters", "forecast", "inventory", "pricing"} <= set(body["result"])
    assert body["result"]["parameters"]["horizon_weeks"] == 8

    again = await client.post(RUN, json=request)
    await error_of(again, 409, "session_exists")


async def test_run_workflow_on_a_session_that_already_has_events_is_409(
    client: AppClient,
) -> None:
    """A session id that already carries a stream (published by another service) cannot
    start a workflow: 409, and its stream is untouched."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    response = await client.post(
        RUN, json={"strategy_description": STRATEGY, "session_id": session_id}
    )
    await error_of(response, 409, "session_exists")
    snapshot = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert snapshot["last_seq"] == 1


NOT_JSON: dict[str, tuple[bytes, str]] = {
    "plain text": (b"not json", "application/json"),
    "an empty body": (b"", "application/json"),
    "a truncated object": (b'{"strategy_description": "x"', "application/json"),
    "single quotes": (b"{'strategy_description': 'x'}", "application/json"),
    "bytes that are not UTF-8": (b'{"strategy_description": "\xff\xfe"}', "application/json"),
    "deeply nested arrays": (b"[" * 20_000 + b"]" * 20_000, "application/json"),
    "a JSON array": (b'["strategy_description"]', "application/json"),
    "a JSON string": (b'"15% off"', "application/json"),
    "null": (b"null", "application/json"),
}


@pytest.mark.parametrize("case", list(NOT_JSON))
async def test_run_workflow_body_that_is_not_a_json_object_is_400(
    client: AppClient, case: str
) -> None:
    """A body that is not a JSON object gets 400 ``invalid_json``, whatever it holds."""
    data, content_type = NOT_JSON[case]
    response = await client.post(RUN, data=data, headers={"Content-Type": content_type})
    await error_of(response, 400, "invalid_json")
    assert hub_of(client.server).subscriber_count == 0


INVALID_RUNS: dict[str, dict[str, Any]] = {
    "no strategy": {},
    "no strategy but a session": {"session_id": "session-0001"},
    "a number as strategy": {"strategy_description": 15},
    "null as strategy": {"strategy_description": None},
    "a list as strategy": {"strategy_description": ["15% off"]},
    "an empty strategy": {"strategy_description": ""},
    "a session id too short": {"strategy_description": STRATEGY, "session_id": "abc"},
    "a session id with a slash": {"strategy_description": STRATEGY, "session_id": "abcd/efghij"},
    "a session id that is a number": {"strategy_description": STRATEGY, "session_id": 12345678},
    "a unicode session id": {"strategy_description": STRATEGY, "session_id": "séssion-0001"},
    "an unknown field": {"strategy_description": STRATEGY, "priority": "high"},
}


async def stored_sessions(server: BaseTestServer, settings: Settings) -> int:
    """How many sessions the broker holds (on Redis: its keys under the test's prefix)."""
    broker = hub_of(server).broker
    if isinstance(broker, MemoryBroker):
        return broker.session_count()
    async with Redis.from_url(settings.redis_url) as redis:
        return len(await redis.keys(f"{settings.redis_key_prefix}:*"))


@pytest.mark.parametrize("case", list(INVALID_RUNS))
async def test_run_workflow_body_that_fails_validation_is_422(
    client: AppClient, settings: Settings, case: str
) -> None:
    """A JSON object that fails validation gets 422 with a readable message naming the
    problem, and no workflow starts."""
    response = await client.post(RUN, json=INVALID_RUNS[case])
    body = await error_of(response, 422, "invalid_request")
    assert body["error"].startswith("Invalid request")
    assert await stored_sessions(client.server, settings) == 0


async def test_run_workflow_strategy_longer_than_the_limit_is_422(
    client: AppClient, settings: Settings
) -> None:
    """A strategy over ``max_strategy_length`` characters gets 422 saying so."""
    long_strategy = "x" * (settings.max_strategy_length + 1)
    response = await client.post(RUN, json={"strategy_description": long_strategy})
    body = await error_of(response, 422)
    assert str(settings.max_strategy_length) in body["error"]


@pytest.mark.parametrize("path", [RUN, events_path("session-0001")])
async def test_body_over_max_body_size_is_413(
    client: AppClient, settings: Settings, path: str
) -> None:
    """A request body over ``max_body_size`` gets 413 ``payload_too_large`` as JSON."""
    oversized = {"strategy_description": "x" * (settings.max_body_size + 1)}
    response = await client.post(path, json=oversized)
    await error_of(response, 413, "payload_too_large")


# --- session snapshot -------------------------------------------------------------------------


async def test_session_snapshot_follows_the_stream(client: AppClient) -> None:
    """``GET /api/sessions/{id}`` tells the state, last id and seq, overall progress, each
    agent's latest status, and once ended the result."""
    session_id = new_session_id()
    await publish(client, session_id, progress(25, agent="orchestrator"))
    await publish(
        client,
        session_id,
        {"type": "agent_status", "agent": "demand", "status": "Forecasting 2/5", "progress": 40},
    )
    await publish(client, session_id, {"type": "complete", "agent": "extraction"})
    last = await publish(
        client,
        session_id,
        {"type": "error", "agent": "pricing", "code": "agent_failed", "error": "Pricing failed."},
    )
    running = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert running["session_id"] == session_id
    assert running["state"] == "running"
    assert (running["last_event_id"], running["last_seq"]) == (last["id"], 4)
    assert running["progress"] == 25
    assert running["agents"]["demand"] == {
        "status": "Forecasting 2/5",
        "progress": 40,
        "state": "running",
    }
    assert running["agents"]["extraction"]["state"] == "complete"
    assert running["agents"]["pricing"]["state"] == "failed"
    assert running["result"] is None

    end = await publish(client, session_id, final({"units": 2579}))
    ended = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert ended["state"] == "complete"
    assert (ended["last_event_id"], ended["last_seq"]) == (end["id"], 5)
    assert ended["progress"] == 100
    assert ended["result"] == {"units": 2579}


@pytest.mark.parametrize(
    ("data", "result"),
    [
        ({"result": {"units": 1}}, {"units": 1}),
        ({"result": [1, 2, 3]}, None),
        ({"result": "done"}, None),
        ({"result": 42}, None),
        ({"units": 1}, None),
        ({}, None),
    ],
)
async def test_a_snapshots_result_is_the_final_complete_events_object_result(
    client: AppClient, data: dict[str, Any], result: dict[str, Any] | None
) -> None:
    """The snapshot's ``result`` is the final ``complete``'s ``data.result`` when that is
    an object, else ``null``: the rule of ``?wait=true``, and the OpenAPI document's
    ``object | null``, whatever a service sent."""
    session_id = new_session_id()
    body = {"type": "complete", "agent": "crawler", "data": data, "final": True}
    await publish(client, session_id, body)
    snapshot = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert (snapshot["state"], snapshot["result"]) == ("complete", result)
    openapi_validate(openapi_validator(), "SessionSnapshot", snapshot)


@pytest.mark.parametrize(("last_progress", "state"), [(100, "complete"), (40, "stopped")])
async def test_an_agent_a_service_left_at_its_last_status_is_complete_or_stopped(
    client: AppClient, last_progress: int, state: str
) -> None:
    """A service reports an agent's ``agent_status`` only (no ``complete`` of its own),
    then ends the session: in the snapshot the agent is ``complete`` if it was at 100 %,
    else ``stopped``; it is ``running`` no more."""
    session_id = new_session_id()
    status = {"type": "agent_status", "agent": "crawler", "status": "Fetching"}
    await publish(client, session_id, {**status, "progress": last_progress})
    snapshot = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert snapshot["agents"]["crawler"]["state"] == "running"
    body = {"type": "complete", "agent": "orchestrator", "final": True, "data": {"result": {}}}
    await publish(client, session_id, body)
    snapshot = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert snapshot["agents"]["crawler"]["state"] == state
    openapi_validate(openapi_validator(), "SessionSnapshot", snapshot)


async def test_snapshot_of_a_failed_session_holds_its_error(client: AppClient) -> None:
    """A session that ended with a final error is ``failed`` and its snapshot tells why."""
    session_id = new_session_id()
    await publish(
        client,
        session_id,
        {
            "type": "error",
            "agent": "orchestrator",
            "final": True,
            "code": "workflow_failed",
            "error": "It failed.",
            "details": "Reference 123",
        },
    )
    snapshot = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert snapshot["state"] == "failed"
    assert snapshot["error"] == {
        "code": "workflow_failed",
        "error": "It failed.",
        "details": "Reference 123",
    }


async def test_snapshot_of_an_unknown_session_is_404(client: AppClient) -> None:
    """A session that never existed (or expired) gets 404 ``session_not_found``."""
    response = await client.get(f"/api/sessions/{new_session_id()}")
    await error_of(response, 404, "session_not_found")


@pytest.mark.parametrize("session_id", ["", "short", "a" * 129, "abcdefgh%2Fijkl", "abcdefgh%00"])
async def test_snapshot_with_a_bad_session_id_is_400(client: AppClient, session_id: str) -> None:
    """A malformed session id gets 400 ``invalid_session_id``."""
    async with client.session.get(http_url(client.server, f"/api/sessions/{session_id}")) as r:
        await error_of(r, 400, "invalid_session_id")


# --- publishing -------------------------------------------------------------------------------


async def test_publish_answers_202_with_the_id_and_seq(client: AppClient) -> None:
    """Publishing answers 202 ``{id, seq}``; seq counts 1, 2, 3 per session, ids differ."""
    session_id, other = new_session_id(), new_session_id()
    first = await publish(client, session_id, progress(1))
    second = await publish(client, session_id, progress(2))
    elsewhere = await publish(client, other, progress(1))
    assert set(first) == {"id", "seq"}
    assert (first["seq"], second["seq"], elsewhere["seq"]) == (1, 2, 1)
    assert len({first["id"], second["id"], elsewhere["id"]}) == 3


async def test_publish_after_the_final_event_is_409(client: AppClient) -> None:
    """Nothing is stored after the final event: publishing gets 409 ``session_ended``."""
    session_id = new_session_id()
    await publish(client, session_id, final())
    response = await client.post(events_path(session_id), json=progress(2))
    await error_of(response, 409, "session_ended")
    snapshot = await (await client.get(f"/api/sessions/{session_id}")).json()
    assert snapshot["last_seq"] == 1


def nested_lists(depth: int) -> list[Any]:
    """``[[[...]]]``, ``depth`` lists deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


INVALID_EVENTS: dict[str, dict[str, Any]] = {
    "progress over 100": {"type": "progress", "agent": "demand", "status": "x", "progress": 150},
    "negative progress": {"type": "progress", "agent": "demand", "status": "x", "progress": -1},
    "progress as text": {"type": "progress", "agent": "demand", "status": "x", "progress": "half"},
    "an unknown type": {"type": "news", "agent": "demand", "status": "x", "progress": 1},
    "no type": {"agent": "demand", "status": "x", "progress": 1},
    "a heartbeat": {"type": "heartbeat", "message": "ping"},
    "no agent": {"type": "agent_status", "status": "x", "progress": 1},
    "an empty agent": {"type": "agent_status", "agent": "", "status": "x", "progress": 1},
    "complete below 100": {"type": "complete", "agent": "demand", "progress": 50},
    "an error without text": {"type": "error", "code": "agent_failed"},
    "an error code with spaces": {"type": "error", "code": "Agent Failed", "error": "x"},
    "data that is a list": {
        "type": "progress",
        "agent": "demand",
        "status": "x",
        "progress": 1,
        "data": [1],
    },
    "an unknown field": {
        "type": "progress",
        "agent": "demand",
        "status": "x",
        "progress": 1,
        "colour": "red",
    },
    "an id": {**progress(1), "id": "abcd1234-9"},
    "a seq": {**progress(1), "seq": 9},
    "a session_id": {**progress(1), "session_id": "another-session"},
    "a timestamp": {**progress(1), "timestamp": "2026-01-01T00:00:00Z"},
    # Valid JSON that the event's encoding cannot write (checked when it is written).
    "data with a lone surrogate escape": {**progress(1), "data": {"note": "\ud800"}},
    "a data key with a lone surrogate escape": {**progress(1), "data": {"\ud800": 1}},
    "a lone surrogate escape deep in data": {**progress(1), "data": {"a": [{"b\udfff": 1}]}},
    "an error's agent of 65 characters": {
        "type": "error",
        "code": "x",
        "error": "x",
        "agent": "a" * 65,
    },
    "an error's empty agent": {"type": "error", "code": "x", "error": "x", "agent": ""},
    "data nested 400 deep": {**progress(1), "data": {"deep": nested_lists(400)}},
    # A stored error under a control code would pass for a notice about the client's own
    # connection (a replay_gap resets a client): those codes are the server's.
    **{
        f"an error coded {code}": {"type": "error", "code": code, "error": "x"}
        for code in CONTROL_ERROR_CODES
    },
}


@pytest.mark.parametrize(
    "headers", [{}, {"Idempotency-Key": "k-1"}], ids=["", "with an idempotency key"]
)
@pytest.mark.parametrize("case", list(INVALID_EVENTS))
async def test_publish_of_an_invalid_event_is_422_and_stores_nothing(
    client: AppClient, case: str, headers: dict[str, str]
) -> None:
    """An event that fails validation, sets what the server fills in (id, seq,
    session_id, timestamp), or is an error under a control code, gets 422 and is not
    stored (with an ``Idempotency-Key`` too, whose digest of the event comes first)."""
    session_id = new_session_id()
    response = await client.post(
        events_path(session_id), json=INVALID_EVENTS[case], headers=headers
    )
    await error_of(response, 422)
    assert (await client.get(f"/api/sessions/{session_id}")).status == 404


async def test_characters_beyond_u_ffff_escaped_as_pairs_are_stored_as_sent(
    client: AppClient,
) -> None:
    """Python's ``json.dumps`` (and aiohttp's ``json=``) escape an emoji as a surrogate
    pair, in keys and values alike: that is text, stored and replayed as sent, and a
    lone surrogate is refused (above), not this."""
    session_id = new_session_id()
    data = {"\N{GRINNING FACE} key": ["\N{GRINNING FACE}", {"\U0001f680": "caf\u00e9"}]}
    await publish(client, session_id, {**progress(1), "data": data})
    page = await (await client.get(f"/api/sessions/{session_id}/events")).json()
    assert page["events"][0]["data"] == data


async def test_publish_of_a_body_that_is_not_json_is_400(client: AppClient) -> None:
    """A publish body that is not JSON gets 400 ``invalid_json``."""
    response = await client.post(
        events_path(new_session_id()), data=b"type=progress", headers={"Content-Type": "text/plain"}
    )
    await error_of(response, 400, "invalid_json")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("path", ["/api/orchestrator/run-workflow", "events"])
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_400(
    client: AppClient, encoding: str, path: str
) -> None:
    """A body sent as ``Content-Encoding: gzip`` (or deflate) that is not: 400
    ``invalid_body``, not a 500. (Sent with curl: aiohttp's server drops the connection
    right after such an answer, which aiohttp's client reports as a disconnection.)"""
    session_id = new_session_id()
    target = events_path(session_id) if path == "events" else path
    curl = await asyncio.create_subprocess_exec(
        *("curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", "10"),
        *("-w", "\n%{http_code}", "-X", "POST", "-H", "Content-Type: application/json"),
        *("-H", f"Content-Encoding: {encoding}", "--data-binary", json.dumps(progress(1))),
        str(http_url(client.server, target)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await curl.communicate()
    assert curl.returncode == 0, err
    text, _, status = out.decode().rpartition("\n")
    assert status == "400", text
    body = json.loads(text)
    assert set(body) == {"error", "code", "reference"} and body["code"] == "invalid_body", body
    assert (await client.get(f"/api/sessions/{session_id}")).status == 404


@pytest.mark.parametrize("charset", ["bogus", "latin-1", "utf-16"])
async def test_json_is_read_as_utf8_whatever_charset_is_declared(
    client: AppClient, charset: str
) -> None:
    """JSON bodies are UTF-8 (RFC 8259): a wrong or unknown charset in the Content-Type
    neither breaks the request nor changes the text."""
    session_id = new_session_id()
    body = json.dumps({**progress(1), "status": "Prévision prête"}, ensure_ascii=False).encode()
    response = await client.post(
        events_path(session_id),
        data=body,
        headers={"Content-Type": f"application/json; charset={charset}"},
    )
    assert response.status == 202, await response.text()
    async with open_aiohttp_sse(
        client.session, http_url(client.server, f"/sse/orchestrator/{session_id}")
    ) as sse:
        [event] = await read_events(sse, 1)
    assert event["status"] == "Prévision prête"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32"])
@pytest.mark.parametrize(
    "data", [{"note": "plain"}, {"\ud800": 1}], ids=["plain", "a lone surrogate key"]
)
async def test_a_body_not_in_utf8_is_400_and_stores_nothing(
    client: AppClient, encoding: str, data: dict[str, Any]
) -> None:
    """JSON is UTF-8 (RFC 8259): a body in UTF-16 or UTF-32 is not valid JSON here (400
    ``invalid_json``), whatever it holds, so none of it is stored, altered or not. (A
    parser that guessed the encoding took a lone surrogate key in UTF-16 past the check
    that refuses it in UTF-8.) A UTF-8 byte order mark is read past."""
    session_id = new_session_id()
    body = json.dumps({**progress(1), "data": data}).encode(encoding, "surrogatepass")
    response = await client.post(events_path(session_id), data=body)
    await error_of(response, 400, "invalid_json")
    assert (await client.get(f"/api/sessions/{session_id}")).status == 404
    if data == {"note": "plain"}:
        bom = "\ufeff" + json.dumps({**progress(1), "data": data})
        await publish_raw(client, session_id, bom.encode())


async def publish_raw(client: AppClient, session_id: str, body: bytes) -> None:
    response = await client.post(events_path(session_id), data=body)
    assert response.status == 202, await response.text()


@pytest.mark.parametrize(
    "session_id", ["", "short", "a" * 129, "abcdefgh%2Fijkl", "s%C3%A9ssion-01"]
)
async def test_publish_to_a_bad_session_id_is_400(client: AppClient, session_id: str) -> None:
    """Publishing to a malformed session id gets 400 ``invalid_session_id``."""
    url = http_url(client.server, events_path(session_id))
    async with client.session.post(url, json=progress(1)) as response:
        await error_of(response, 400, "invalid_session_id")


async def test_publish_token_is_required_when_configured(
    make_client: ClientFactory, settings: Settings
) -> None:
    """With a publish token configured, publishing needs ``Authorization: Bearer <token>``:
    none, a wrong one or another scheme gets 401; the right one 202."""
    client = await make_client(settings.replace(publish_token="s3cret-token"))
    session_id = new_session_id()
    path = events_path(session_id)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Bearer s3cret-token-and-more"},
        {"Authorization": "Basic s3cret-token"},
        {"Authorization": "s3cret-token"},
    ):
        response = await client.post(path, json=progress(1), headers=headers)
        body = await error_of(response, 401, "unauthorized")
        assert "s3cret" not in body["error"]
    response = await client.post(
        path, json=progress(1), headers={"Authorization": "Bearer s3cret-token"}
    )
    assert response.status == 202
    assert (await response.json())["seq"] == 1


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.123", 9))  # a documentation address: nothing is sent
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


async def test_without_a_token_only_loopback_clients_may_publish(
    aiohttp_server: Callable[..., Awaitable[BaseTestServer]], settings: Settings
) -> None:
    """With no publish token, a client connecting from another address gets 403."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = await aiohttp_server(create_app(settings), host=address)
    async with ClientSession() as session:
        url = f"http://{address}:{server.port}{events_path(new_session_id())}"
        async with session.post(url, json=progress(1)) as response:
            await error_of(response, 403, "forbidden")


# --- health and metrics -----------------------------------------------------------------------


async def test_healthz_and_readyz_answer_200(client: AppClient) -> None:
    """``/healthz`` (alive) and ``/readyz`` (the broker is reachable) answer 200."""
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(client: AppClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    return samples(await response.text())


def sample(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_connections_by_transport_and_events_published_and_delivered(
    client: AppClient,
) -> None:
    """``/metrics`` is Prometheus text with open connections by transport (up while a
    client is connected, down after) and counters of events published and delivered."""
    before = await scrape(client)
    for transport in ("websocket", "sse"):
        assert ("orchestrator_connections", frozenset({("transport", transport)})) in before
    session_id = new_session_id()
    hub = hub_of(client.server)
    async with (
        open_aiohttp_ws(
            client.session, ws_url(client.server, f"/ws/orchestrator/{session_id}")
        ) as ws,
        open_aiohttp_sse(
            client.session, http_url(client.server, f"/sse/orchestrator/{session_id}")
        ) as sse,
    ):
        await wait_until(lambda: hub.subscriber_count == 2, "two subscriptions")
        during = await scrape(client)
        for transport in ("websocket", "sse"):
            assert sample(during, "orchestrator_connections", transport=transport) == 1
        for n in (1, 2):
            await publish(client, session_id, progress(n))
        await publish(client, session_id, final())
        assert seqs(await read_to_end(ws)) == [1, 2, 3]
        assert seqs(await read_to_end(sse)) == [1, 2, 3]
    await wait_until(lambda: hub.subscriber_count == 0, "the subscriptions to end")
    after = await scrape(client)
    published = "orchestrator_events_published_total"
    assert (
        sample(after, published, type="progress") - sample(before, published, type="progress") == 2
    )
    assert (
        sample(after, published, type="complete") - sample(before, published, type="complete") == 1
    )
    delivered = "orchestrator_events_delivered_total"
    for transport in ("websocket", "sse"):
        moved = sample(after, delivered, transport=transport) - sample(
            before, delivered, transport=transport
        )
        assert moved == 3, transport
        assert sample(after, "orchestrator_connections", transport=transport) == 0


# --- errors in general ------------------------------------------------------------------------

ERRORS: dict[str, tuple[str, str, Any, int]] = {
    "an unknown path": ("GET", "/api/nothing-here", None, 404),
    "a wrong method": ("GET", RUN, None, 405),
    "a wrong method on events": ("PUT", events_path("session-0001"), None, 405),
    "a bad session id": ("GET", "/api/sessions/x", None, 400),
    "not JSON": ("POST", RUN, b"{nope", 400),
    "invalid JSON types": ("POST", RUN, {"strategy_description": {"a": 1}}, 422),
    "an invalid event": ("POST", events_path("session-0001"), {"type": 1}, 422),
    # The streams answer their own errors (server/app.py, errors_middleware).
    "a plain GET on the WebSocket URL": ("GET", "/ws/orchestrator/session-0001", None, 400),
    "a bad session id on SSE": ("GET", "/sse/orchestrator/x", None, 400),
}


@pytest.mark.parametrize("case", list(ERRORS))
async def test_every_error_body_is_error_code_reference_and_leaks_nothing(
    client: AppClient, case: str
) -> None:
    """Every error answer is JSON with exactly ``error``, ``code`` and ``reference``, and
    holds no traceback, file path or exception name."""
    method, path, body, status = ERRORS[case]
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    response = await client.request(method, path, **kwargs)
    await error_of(response, status)


async def test_a_wrong_method_is_told_which_methods_the_address_takes(client: AppClient) -> None:
    """405 carries ``Allow`` (RFC 9110 requires it), beside the JSON error shape."""
    response = await client.request("PUT", events_path("session-0001"))
    await error_of(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    response = await client.get(RUN)
    await error_of(response, 405)
    assert "POST" in response.headers["Allow"].split(",")


async def test_references_differ_between_errors(client: AppClient) -> None:
    """Each error gets its own reference id, to find its log line."""
    references = set()
    for _ in range(3):
        response = await client.get("/api/sessions/x")
        references.add((await error_of(response, 400))["reference"])
    assert len(references) == 3


async def test_publish_with_every_event_type_reaches_subscribers(client: AppClient) -> None:
    """``agent_status``, ``progress``, ``complete`` and ``error`` events published by other
    services are stored and streamed like the orchestrator's own."""
    session_id = new_session_id()
    bodies: list[Event] = [
        {"type": "agent_status", "agent": AGENTS[1], "status": "Starting", "progress": 0},
        progress(10),
        {"type": "complete", "agent": AGENTS[1]},
        {"type": "error", "agent": AGENTS[2], "code": "agent_timeout", "error": "Too slow."},
        final(),
    ]
    for body in bodies:
        await publish(client, session_id, body)
    async with open_aiohttp_sse(
        client.session, http_url(client.server, f"/sse/orchestrator/{session_id}")
    ) as sse:
        events = await read_to_end(sse)
    assert [event["type"] for event in events] == [body["type"] for body in bodies]
    assert events[2]["status"] == "Complete" and events[2]["progress"] == 100
    assert events[3]["final"] is False and events[3]["details"] == ""
