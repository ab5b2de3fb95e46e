"""The published contract: the AsyncAPI and OpenAPI documents are served, every ``$ref`` in
them resolves, and what a real server sends (every event of a real workflow over WebSocket
and SSE, the control events, the REST answers) validates against them."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from server.config import Settings
from server.contract import (
    EVENT_MESSAGES,
    TIMESTAMP_PATTERN,
    asyncapi_document,
    openapi_document,
)
from server.messages import HeartbeatEvent
from tests.browser.support import LiveServer, running_server
from tests.timing import EVENT_TIMEOUT, HEARTBEAT_INTERVAL, WORKFLOW_TIMEOUT

STRATEGY = "15% off outdoor furniture for 8 weeks"
ASYNCAPI_URI = "urn:contract:asyncapi"
OPENAPI_URI = "urn:contract:openapi"


# --- the documents ------------------------------------------------------------------------


def iter_refs(node: Any, path: str = "#") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield path, value
            else:
                yield from iter_refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from iter_refs(value, f"{path}/{index}")


def registry_of(uri: str, document: dict[str, Any]) -> Registry[Any]:
    resource: Resource[Any] = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(uri, resource)
    return registry


def resolve(uri: str, document: dict[str, Any], ref: str) -> Any:
    return registry_of(uri, document).resolver(base_uri=uri).lookup(ref).contents


class AsyncApiContract:
    """Message payload validators of the AsyncAPI document, found the way a code
    generator would: channel -> message ``$ref`` -> ``payload.schema``."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.by_channel: dict[str, dict[str, Draft202012Validator]] = {}
        for channel_name, channel in document["channels"].items():
            validators: dict[str, Draft202012Validator] = {}
            for message_ref in channel["messages"].values():
                message = resolve(ASYNCAPI_URI, document, message_ref["$ref"])
                payload = message["payload"]
                assert payload["schemaFormat"].startswith("application/schema+json")
                schema = payload["schema"]
                Draft202012Validator.check_schema(schema)
                kind = event_type_of(schema) or message["name"]
                validators[kind] = Draft202012Validator(
                    schema,
                    registry=registry_of(ASYNCAPI_URI, document),
                    format_checker=Draft202012Validator.FORMAT_CHECKER,
                )
            self.by_channel[channel_name] = validators

    def validate(self, channel: str, event: dict[str, Any]) -> None:
        validators = self.by_channel[channel]
        assert event.get("type") in validators, f"no message of type {event.get('type')!r}"
        validators[event["type"]].validate(event)


def event_type_of(schema: dict[str, Any]) -> str | None:
    type_property = schema.get("properties", {}).get("type", {})
    const = type_property.get("const")
    return const if isinstance(const, str) else None


@pytest.fixture(scope="module")
def contract() -> AsyncApiContract:
    return AsyncApiContract(asyncapi_document())


def test_asyncapi_document_shape() -> None:
    """AsyncAPI 3.0 with the WebSocket and SSE channels (a ``{session_id}`` parameter), the
    five event messages and the publish operation; every ``$ref`` resolves."""
    doc = asyncapi_document()
    assert doc["asyncapi"] == "3.0.0"
    channels = doc["channels"]
    assert channels["websocketStream"]["address"] == "/ws/orchestrator/{session_id}"
    assert channels["sseStream"]["address"] == "/sse/orchestrator/{session_id}"
    for channel in channels.values():
        assert set(channel["parameters"]) == {"session_id"}
    messages = doc["components"]["messages"]
    assert set(EVENT_MESSAGES) <= set(messages)
    assert len(EVENT_MESSAGES) == 5
    publish = doc["operations"]["receivePublishedEvent"]
    assert publish["action"] == "receive"
    assert publish["bindings"]["http"]["method"] == "POST"
    assert resolve(ASYNCAPI_URI, doc, publish["channel"]["$ref"])["address"] == (
        "/api/sessions/{session_id}/events"
    )
    refs = list(iter_refs(doc))
    assert refs
    for where, ref in refs:
        assert resolve(ASYNCAPI_URI, doc, ref) is not None, where


def test_openapi_document_shape() -> None:
    """OpenAPI 3.1 with the REST endpoints; every ``$ref`` resolves and every component
    schema is a valid JSON Schema."""
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    assert {
        "/api/orchestrator/run-workflow",
        "/api/sessions/{session_id}",
        "/api/sessions/{session_id}/cancel",
        "/api/sessions/{session_id}/events",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(doc["paths"])
    for where, ref in iter_refs(doc):
        assert resolve(OPENAPI_URI, doc, ref) is not None, where
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_schemas_follow_the_models() -> None:
    """The documents are generated, not copied: a model field shows up in its schema."""
    from server.api import RunWorkflowRequest
    from server.messages import ErrorEvent

    doc = asyncapi_document()
    error = doc["components"]["messages"]["Error"]["payload"]["schema"]
    assert set(ErrorEvent.model_fields) <= set(error["properties"])
    request = openapi_document()["components"]["schemas"]["RunWorkflowRequest"]
    assert set(request["properties"]) == set(RunWorkflowRequest.model_fields)


# --- a real server ------------------------------------------------------------------------


@pytest.fixture
async def live() -> AsyncIterator[LiveServer]:
    settings = Settings(port=0, heartbeat_interval=HEARTBEAT_INTERVAL, session_ttl=60.0)
    async with running_server(settings) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_documents_are_served(live: LiveServer, http: aiohttp.ClientSession) -> None:
    """``GET /asyncapi.json`` and ``/openapi.json`` serve the generated documents."""
    for path, expected in (("/asyncapi.json", asyncapi_document()), ("/openapi.json", None)):
        async with http.get(live.url + path) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            body = await response.json()
        if expected is not None:
            assert body == expected
    async with http.get(live.url + "/openapi.json") as response:
        assert await response.json() == openapi_document()


async def read_websocket(
    http: aiohttp.ClientSession, url: str, opened: asyncio.Event
) -> tuple[list[dict[str, Any]], int | None]:
    """Every event until the server closes; and the close code."""
    events: list[dict[str, Any]] = []
    async with http.ws_connect(url) as ws:
        opened.set()
        async for message in ws:
            assert message.type is aiohttp.WSMsgType.TEXT
            events.append(json.loads(message.data))
        return events, ws.close_code


async def read_sse(
    http: aiohttp.ClientSession, url: str, opened: asyncio.Event
) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """Every SSE frame until the response ends: (its fields, its parsed data)."""
    frames: list[tuple[dict[str, str], dict[str, Any]]] = []
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        opened.set()
        fields: dict[str, str] = {}
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                frames.append((fields, json.loads(fields["data"])))
            fields = {}
    return frames


async def start_workflow(
    http: aiohttp.ClientSession, live: LiveServer, session_id: str, openapi: Draft202012Validator
) -> None:
    body = {"strategy_description": STRATEGY, "session_id": session_id}
    async with http.post(f"{live.url}/api/orchestrator/run-workflow", json=body) as response:
        assert response.status == 202
        openapi_validate(openapi, "RunWorkflowAccepted", await response.json())


def openapi_validator() -> Draft202012Validator:
    doc = openapi_document()
    return Draft202012Validator({}, registry=registry_of(OPENAPI_URI, doc))


def openapi_validate(validator: Draft202012Validator, schema_name: str, instance: Any) -> None:
    schema = {"$ref": f"{OPENAPI_URI}#/components/schemas/{schema_name}"}
    validator.evolve(schema=schema).validate(instance)


async def test_every_event_of_a_workflow_matches_the_asyncapi_messages(
    live: LiveServer, http: aiohttp.ClientSession, contract: AsyncApiContract
) -> None:
    """A real workflow, followed over WebSocket and SSE at once: every event each transport
    delivers validates against its channel's message schema, and both see the same events."""
    session_id = "contract-workflow-0001"
    ws_open, sse_open = asyncio.Event(), asyncio.Event()
    openapi = openapi_validator()
    async with asyncio.timeout(WORKFLOW_TIMEOUT):
        ws_task = asyncio.create_task(
            read_websocket(http, live.ws_url(f"/ws/orchestrator/{session_id}"), ws_open)
        )
        sse_task = asyncio.create_task(
            read_sse(http, f"{live.url}/sse/orchestrator/{session_id}", sse_open)
        )
        await asyncio.wait_for(asyncio.gather(ws_open.wait(), sse_open.wait()), EVENT_TIMEOUT)
        await start_workflow(http, live, session_id, openapi)
        (ws_events, close_code), sse_frames = await asyncio.gather(ws_task, sse_task)

    assert close_code == 1000
    for event in ws_events:
        contract.validate("websocketStream", event)
    for fields, event in sse_frames:
        contract.validate("sseStream", event)
        assert fields["event"] == event["type"]
        assert fields.get("id") == event.get("id")  # only stored events carry an id

    def stored(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if "id" in e]

    ws_stored = stored(ws_events)
    sse_stored = stored([event for _, event in sse_frames])
    assert ws_stored == sse_stored
    assert [e["seq"] for e in ws_stored] == list(range(1, len(ws_stored) + 1))
    assert {e["type"] for e in ws_stored} == {"progress", "agent_status", "complete"}
    assert ws_stored[-1]["final"] is True
    assert set(ws_stored[-1]["data"]["result"]) >= {"parameters", "forecast", "pricing"}

    async with http.get(f"{live.url}/api/sessions/{session_id}") as response:
        assert response.status == 200
        openapi_validate(openapi, "SessionSnapshot", await response.json())


async def test_control_events_match_the_asyncapi_messages(
    live: LiveServer, http: aiohttp.ClientSession, contract: AsyncApiContract
) -> None:
    """Heartbeats (the answer to a ping), ``invalid_message``, ``replay_gap`` and
    ``invalid_session_id`` validate too, over both transports."""
    session_id = "contract-control-0001"
    url = f"{live.url}/api/sessions/{session_id}/events"
    openapi = openapi_validator()
    published = {"type": "progress", "agent": "orchestrator", "status": "Working", "progress": 5}
    async with http.post(url, json=published) as response:
        assert response.status == 202
        openapi_validate(openapi, "PublishAccepted", await response.json())

    seen: list[dict[str, Any]] = []
    ws_url = live.ws_url(f"/ws/orchestrator/{session_id}?last_event_id=nope-1")
    async with http.ws_connect(ws_url) as ws, asyncio.timeout(EVENT_TIMEOUT):
        await ws.send_str('{"type": "ping"}')
        await ws.send_str("hello?")
        while not (
            {"heartbeat", "invalid_message", "replay_gap"}
            <= {e.get("code", e["type"]) for e in seen}
        ):
            seen.append(json.loads(await ws.receive_str()))
    for event in seen:
        contract.validate("websocketStream", event)

    async with (
        http.get(
            f"{live.url}/sse/orchestrator/{session_id}", headers={"Last-Event-ID": "zz-9"}
        ) as response,
        asyncio.timeout(EVENT_TIMEOUT),
    ):
        frames: list[dict[str, Any]] = []
        block: list[str] = []
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line:
                block.append(line)
                continue
            data = [item[len("data: ") :] for item in block if item.startswith("data: ")]
            block = []
            if data:
                frames.append(json.loads(data[0]))
            if {"replay_gap", "heartbeat"} <= {f.get("code", f["type"]) for f in frames}:
                break
    for event in frames:
        contract.validate("sseStream", event)

    async with http.ws_connect(live.ws_url("/ws/orchestrator/bad!id")) as ws:
        notice = json.loads(await ws.receive_str(timeout=EVENT_TIMEOUT))
        contract.validate("websocketStream", notice)
        assert notice["code"] == "invalid_session_id"
        await ws.receive(timeout=EVENT_TIMEOUT)
        assert ws.close_code == 1008


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/orchestrator/run-workflow", "not json", 400),
        ("POST", "/api/orchestrator/run-workflow", {"strategy_description": ""}, 422),
        ("GET", "/api/sessions/bad!id", None, 400),
        ("GET", "/api/sessions/never-started-0001", None, 404),
        ("POST", "/api/sessions/contract-errors-01/events", {"type": "heartbeat"}, 422),
        ("GET", "/sse/orchestrator/bad!id", None, 400),
    ],
)
async def test_error_answers_match_the_openapi_error_shape(
    live: LiveServer,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    """Every REST error body is the documented ``Error`` shape, with the documented status."""
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, str) else {"json": body}
    async with http.request(method, live.url + path, **kwargs) as response:
        assert response.status == status
        payload = await response.json()
    openapi_validate(openapi_validator(), "Error", payload)
    operation = openapi_document()["paths"]
    documented = [
        op
        for template, item in operation.items()
        for verb, op in item.items()
        if verb == method.lower() and matches(template, path)
    ]
    assert documented, f"{method} {path} is not documented"
    assert str(status) in documented[0]["responses"]


def matches(template: str, path: str) -> bool:
    parts, actual = template.split("/"), path.split("/")
    return len(parts) == len(actual) and all(
        p == a or (p.startswith("{") and p.endswith("}"))
        for p, a in zip(parts, actual, strict=True)
    )


async def test_a_workflow_outcome_matches_the_openapi_schema(
    live: LiveServer, http: aiohttp.ClientSession
) -> None:
    """``?wait=true`` answers with the documented outcome shape; a second run of the same
    session gets the documented 409; the session's events come in the documented page."""
    session_id = "contract-wait-0001"
    body = {"strategy_description": STRATEGY, "session_id": session_id}
    openapi = openapi_validator()
    url = f"{live.url}/api/orchestrator/run-workflow"
    async with asyncio.timeout(WORKFLOW_TIMEOUT), http.post(url + "?wait=true", json=body) as r:
        assert r.status == 200
        outcome = await r.json()
    openapi_validate(openapi, "RunWorkflowOutcome", outcome)
    assert outcome["status"] == "complete"
    async with http.post(url, json=body) as response:
        assert response.status == 409
        openapi_validate(openapi, "Error", await response.json())
    for path in ("/healthz", "/readyz"):
        async with http.get(live.url + path) as response:
            assert response.status == 200
            openapi_validate(openapi, "Status", await response.json())
    async with http.get(f"{live.url}/api/sessions/{session_id}/events?limit=3") as response:
        assert response.status == 200
        page = await response.json()
    openapi_validate(openapi, "SessionEvents", page)
    assert len(page["events"]) == 3 and page["more"] and page["ended"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"seq": None}, "a stored progress event needs its seq"),
        ({"timestamp": "2026-11-27T20:01:02+01:00"}, "timestamps are UTC with a Z"),
        ({"progress": 101}, "progress is 0-100"),
        ({"type": "progress!"}, "unknown type"),
        ({"data": []}, "data is an object"),
    ],
)
def test_the_message_schemas_reject_what_the_contract_forbids(
    contract: AsyncApiContract, change: dict[str, Any], why: str
) -> None:
    """The validators are not vacuous: a broken event fails."""
    event: dict[str, Any] = {
        "type": "progress",
        "session_id": "session-0001",
        "timestamp": "2026-11-27T20:01:02.123456Z",
        "agent": "orchestrator",
        "status": "Working",
        "progress": 5,
        "data": {},
        "id": "abc-1",
        "seq": 1,
    }
    contract.validate("websocketStream", event)
    broken = {k: v for k, v in {**event, **change}.items() if v is not None}
    with pytest.raises((ValidationError, AssertionError)):
        contract.validate("websocketStream", broken)


@pytest.mark.parametrize(
    "given",
    [
        None,  # the server's own clock
        datetime(2026, 11, 27, 20, 1, 2, tzinfo=UTC),  # no fraction of a second
        datetime(2026, 11, 27, 21, 1, 2, 500000, tzinfo=timezone(timedelta(hours=1))),
        datetime(2026, 11, 27, 20, 1, 2, 7),  # naive: taken as UTC
    ],
)
def test_every_timestamp_goes_out_as_utc_with_a_z(
    contract: AsyncApiContract, given: datetime | None
) -> None:
    """However an event's timestamp was made, the wire has RFC 3339 in UTC with a ``Z``
    (the contract's pattern) naming the same instant."""
    fields: dict[str, Any] = {"session_id": "session-0001"}
    if given is not None:
        fields["timestamp"] = given
    before = datetime.now(UTC)
    event = json.loads(HeartbeatEvent(**fields).model_dump_json())
    assert re.fullmatch(TIMESTAMP_PATTERN, event["timestamp"])
    sent = datetime.fromisoformat(event["timestamp"])
    if given is None:
        assert before <= sent <= datetime.now(UTC)
    else:
        assert sent == (given if given.tzinfo else given.replace(tzinfo=UTC))
    contract.validate("websocketStream", event)
