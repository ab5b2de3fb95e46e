"""The wire contract, published: AsyncAPI 3.0 for the streams, OpenAPI 3.1 for REST.

Both documents are generated from the pydantic models the server itself uses
(``server.messages`` for events, ``server.api`` for request bodies), so they
cannot drift from the code. The few facts a model cannot state are added here,
each in one place and said why:

* ``id`` and ``seq`` are not model fields: the broker splices them into the
  encoded JSON of stored events (:class:`server.messages.StoredEvent`);
* the server writes every field of an event, defaults included, so in the
  *serialization* schemas every property is required;
* ``timestamp`` is always UTC, written with a ``Z`` (the model makes it so),
  which a schema's ``date-time`` alone does not say, so its pattern is added;
* a published event's ``session_id`` and ``timestamp`` come from the server.

REST responses other than errors are plain dicts in ``server.api``; their
shapes are the response models below, and ``tests/test_contract.py`` checks
real responses against them.

Served at ``GET /asyncapi.json`` and ``GET /openapi.json``
(:func:`add_contract_routes`).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from .api import RunWorkflowRequest
from .messages import (
    CONTROL_ERROR_CODES,
    SESSION_ID_PATTERN,
    AgentStatusEvent,
    CompleteEvent,
    ErrorEvent,
    HeartbeatEvent,
    ProgressEvent,
)

JsonObject = dict[str, Any]

TITLE = "Orchestrator progress stream"
VERSION = "1.0.0"
JSON_SCHEMA_2020_12 = "application/schema+json;version=draft-2020-12"
TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$"

# The five event messages: AsyncAPI message name -> (model, stored?).
# stored: True = always has id/seq; False = never; None = both kinds exist.
EVENT_MESSAGES: dict[str, tuple[type[BaseModel], bool | None]] = {
    "AgentStatus": (AgentStatusEvent, True),
    "Progress": (ProgressEvent, True),
    "Complete": (CompleteEvent, True),
    "Error": (ErrorEvent, None),
    "Heartbeat": (HeartbeatEvent, False),
}
PUBLISHABLE: dict[str, type[BaseModel]] = {
    "AgentStatus": AgentStatusEvent,
    "Progress": ProgressEvent,
    "Complete": CompleteEvent,
    "Error": ErrorEvent,
}
SERVER_FILLED = ("session_id", "timestamp", "id", "seq")


class WireSchema(GenerateJsonSchema):
    """Serialization schemas of what is on the wire: every field is written, so every
    field is required (pydantic's ``json_schema_serialization_defaults_required``)."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode == "serialization":
            return True
        return super().field_is_required(field, total)


# --- event schemas ----------------------------------------------------------------------


def event_schema(model: type[BaseModel], stored: bool | None) -> JsonObject:
    """The JSON Schema (2020-12) of one event type exactly as the server sends it."""
    schema = model.model_json_schema(mode="serialization", schema_generator=WireSchema)
    properties: JsonObject = schema["properties"]
    properties["timestamp"] = {
        **properties["timestamp"],
        "format": "date-time",
        "pattern": TIMESTAMP_PATTERN,
        "description": "RFC 3339 in UTC",
    }
    if stored is not False:
        properties["id"] = {
            "type": "string",
            "minLength": 1,
            "description": "Position in the session's stream; opaque to clients. "
            "Resume after it with ?last_event_id= or Last-Event-ID.",
        }
        properties["seq"] = {
            "type": "integer",
            "minimum": 1,
            "description": "1, 2, 3 ... per session, +1 for each stored event.",
        }
        if stored:
            schema["required"] = [*schema["required"], "id", "seq"]
        else:
            schema["dependentRequired"] = {"id": ["seq"], "seq": ["id"]}
    return schema


def publish_schema(model: type[BaseModel]) -> JsonObject:
    """The body of ``POST /api/sessions/{id}/events`` for one event type: the model's
    input schema without the fields the server fills in; ``type`` picks the model."""
    schema = model.model_json_schema(mode="validation")
    for name in SERVER_FILLED:
        schema["properties"].pop(name, None)
    required = [name for name in schema.get("required", []) if name not in SERVER_FILLED]
    schema["required"] = ["type", *required]
    schema["title"] = f"Publish{model.__name__}"
    return schema


def _multi_format(schema: JsonObject) -> JsonObject:
    return {"schemaFormat": JSON_SCHEMA_2020_12, "schema": schema}


# --- AsyncAPI ----------------------------------------------------------------------------

_SESSION_PARAMETER = {
    "description": f"The session's id: {SESSION_ID_PATTERN.pattern} (a UUID4 fits).",
    "examples": ["3f9a6c1e-8d2b-4c11-9a57-0d6f2b1e4c88"],
}

_TOKEN_SCHEMA = {
    "type": "string",
    "description": "The stream token returned by run-workflow; required when the server "
    "is configured with a stream token secret, ignored otherwise.",
}

_STREAM_RULES = (
    "Stored events (those with `id`) arrive in `seq` order, each at most once per "
    "connection; a new subscriber gets every retained event, then live ones. The last "
    "stored event has `final: true`. Control events (heartbeats and the error codes "
    + ", ".join(f"`{code}`" for code in CONTROL_ERROR_CODES)
    + ") go to one connection only, carry no `id` and are never replayed. Clients must "
    "ignore fields they do not know."
)


def _message_key(name: str) -> str:
    return name[0].lower() + name[1:]


def _event_messages() -> JsonObject:
    messages: JsonObject = {}
    for name, (model, stored) in EVENT_MESSAGES.items():
        kind = {True: "stored", False: "never stored", None: "stored, or a control event"}
        messages[name] = {
            "name": name,
            "title": model.__name__,
            "summary": (model.__doc__ or "").strip().splitlines()[0],
            "description": f"`type: {model.model_fields['type'].default}` ({kind[stored]}).",
            "contentType": "application/json",
            "payload": _multi_format(event_schema(model, stored)),
        }
    messages["Ping"] = {
        "name": "Ping",
        "title": "Ping command",
        "summary": "WebSocket only: ask for a heartbeat at once.",
        "description": "Any other frame gets a control error `invalid_message`; a frame "
        "larger than the configured limit closes the connection with 1009.",
        "contentType": "application/json",
        "payload": _multi_format(
            {
                "type": "object",
                "properties": {"type": {"const": "ping"}},
                "required": ["type"],
            }
        ),
    }
    messages["PublishEvent"] = {
        "name": "PublishEvent",
        "title": "An event published by another service",
        "summary": "The type-specific fields of one event; the server fills in "
        + ", ".join(f"`{name}`" for name in SERVER_FILLED)
        + ".",
        "contentType": "application/json",
        "payload": _multi_format(
            {"oneOf": [publish_schema(model) for model in PUBLISHABLE.values()]}
        ),
    }
    return messages


def _channel_messages(names: list[str]) -> JsonObject:
    return {_message_key(name): {"$ref": f"#/components/messages/{name}"} for name in names}


def _operation_messages(channel: str, names: list[str]) -> list[JsonObject]:
    return [{"$ref": f"#/channels/{channel}/messages/{_message_key(name)}"} for name in names]


@cache
def _asyncapi() -> JsonObject:
    events = list(EVENT_MESSAGES)
    query = {
        "type": "object",
        "properties": {
            "last_event_id": {
                "type": "string",
                "description": "Resume after this stored event id.",
            },
            "token": _TOKEN_SCHEMA,
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Real-time progress of the AI-agent orchestrator's workflow, per "
            "session, over WebSocket or Server-Sent Events. This document describes the "
            "server: it *sends* the events and *receives* pings and published events. "
            + _STREAM_RULES,
        },
        "defaultContentType": "application/json",
        "servers": {
            "websocket": {
                "host": "localhost:8000",
                "protocol": "ws",
                "description": "The WebSocket endpoint (wss behind TLS).",
            },
            "http": {
                "host": "localhost:8000",
                "protocol": "http",
                "description": "Server-Sent Events and the publish endpoint (https behind TLS).",
            },
        },
        "channels": {
            "websocketStream": {
                "address": "/ws/orchestrator/{session_id}",
                "title": "A session's stream over WebSocket",
                "description": "One text frame per event. Close codes: 1000 after the final "
                "event (do not reconnect); 1001 server going away (reconnect and resume); "
                "1008 refused: bad session id, origin or token (do not reconnect); 1009 "
                "frame too large; 1011 internal error and 1013 overloaded or too slow "
                "(reconnect with back-off and resume). " + _STREAM_RULES,
                "servers": [{"$ref": "#/servers/websocket"}],
                "parameters": {"session_id": _SESSION_PARAMETER},
                "messages": _channel_messages([*events, "Ping"]),
                "bindings": {"ws": {"method": "GET", "query": query, "bindingVersion": "0.1.0"}},
            },
            "sseStream": {
                "address": "/sse/orchestrator/{session_id}",
                "title": "A session's stream as Server-Sent Events",
                "description": "`Content-Type: text/event-stream`. The stream starts with a "
                "`retry:` line; each event is `id: <id>` (stored events only), "
                "`event: <type>`, one `data: <json>` line and a blank line. Resume with the "
                "`Last-Event-ID` header or `?last_event_id=` (the header wins); "
                "`?token=` when stream tokens are on. The response ends after the final "
                "event; a resume at the final event gets 204 No Content. Refusals are "
                "plain HTTP errors: 400 bad session id, 401 missing or invalid token, 503 "
                "overloaded (retry later). " + _STREAM_RULES,
                "servers": [{"$ref": "#/servers/http"}],
                "parameters": {"session_id": _SESSION_PARAMETER},
                "messages": _channel_messages(events),
            },
            "sessionEvents": {
                "address": "/api/sessions/{session_id}/events",
                "title": "Publish into a session",
                "description": 'POST one event; answers `202 {"id", "seq"}`, 409 after '
                "the final event, 422 when invalid. Needs `Authorization: Bearer <token>` "
                "when a publish token is configured, else loopback clients only.",
                "servers": [{"$ref": "#/servers/http"}],
                "parameters": {"session_id": _SESSION_PARAMETER},
                "messages": _channel_messages(["PublishEvent"]),
            },
        },
        "operations": {
            "sendWebSocketEvents": {
                "action": "send",
                "title": "Stream a session's events over WebSocket",
                "channel": {"$ref": "#/channels/websocketStream"},
                "messages": _operation_messages("websocketStream", events),
            },
            "receivePing": {
                "action": "receive",
                "title": "Answer a client's ping with a heartbeat",
                "channel": {"$ref": "#/channels/websocketStream"},
                "messages": _operation_messages("websocketStream", ["Ping"]),
                "reply": {
                    "channel": {"$ref": "#/channels/websocketStream"},
                    "messages": _operation_messages("websocketStream", ["Heartbeat"]),
                },
            },
            "sendSseEvents": {
                "action": "send",
                "title": "Stream a session's events as Server-Sent Events",
                "channel": {"$ref": "#/channels/sseStream"},
                "messages": _operation_messages("sseStream", events),
                "bindings": {"http": {"method": "GET", "bindingVersion": "0.3.0"}},
            },
            "receivePublishedEvent": {
                "action": "receive",
                "title": "Accept an event published by another service",
                "channel": {"$ref": "#/channels/sessionEvents"},
                "messages": _operation_messages("sessionEvents", ["PublishEvent"]),
                "bindings": {"http": {"method": "POST", "bindingVersion": "0.3.0"}},
            },
        },
        "components": {"messages": _event_messages()},
    }


def asyncapi_document() -> JsonObject:
    """The AsyncAPI 3.0 document of the streams (a fresh copy each call)."""
    return copy.deepcopy(_asyncapi())


# --- OpenAPI: response shapes -----------------------------------------------------------


class ErrorBody(BaseModel):
    """Every JSON error of the REST API. Never holds internals."""

    model_config = ConfigDict(title="Error")

    error: str = Field(description="human text, safe to show")
    code: str = Field(description="machine code, e.g. invalid_json, session_exists")
    reference: str | None = Field(
        default=None, description="ties the error to a server log line; quote it to support"
    )


class StreamUrls(BaseModel):
    websocket: str = Field(examples=["/ws/orchestrator/3f9a6c1e"])
    sse: str = Field(examples=["/sse/orchestrator/3f9a6c1e"])


_TOKEN_FIELD = Field(
    default=None,
    description="the stream token of this session (?token= on its streams and its "
    "snapshot); present only when the server requires stream tokens",
)


class RunWorkflowAccepted(BaseModel):
    """``202``: the workflow runs; follow it on one of the streams."""

    session_id: str
    status: Literal["running"]
    stream: StreamUrls
    token: str | None = _TOKEN_FIELD


class WorkflowError(BaseModel):
    code: str
    error: str
    reference: str | None = Field(
        default=None,
        description="the reference of the server's log line about it, when it logged one "
        "(not for a workflow ended by a cancel or by another final event)",
    )


class RunWorkflowOutcome(BaseModel):
    """``200`` with ``?wait=true``: the workflow has ended."""

    session_id: str
    status: Literal["complete", "failed"]
    result: dict[str, Any] | None = Field(
        description="strategy, parameters, extraction_method, forecast, inventory, pricing"
    )
    stream: StreamUrls
    token: str | None = _TOKEN_FIELD
    error: WorkflowError | None = None


class WorkflowCancelled(BaseModel):
    """``200``: the workflow's final event, ``workflow_cancelled``, is stored (by this
    request, or by an earlier cancel)."""

    session_id: str
    status: Literal["cancelled"]


class AgentSnapshot(BaseModel):
    status: str
    progress: int = Field(ge=0, le=100)
    state: Literal["running", "complete", "failed", "stopped"] = Field(
        description="stopped: still running, short of 100 %, when the session ended "
        "(cancelled, say)"
    )


class SessionError(BaseModel):
    code: str
    error: str
    details: str


class SessionSnapshot(BaseModel):
    """A session's state, folded from its retained events."""

    session_id: str
    state: Literal["pending", "running", "complete", "failed"]
    last_event_id: str | None
    last_seq: int = Field(ge=0)
    progress: int = Field(ge=0, le=100, description="the orchestrator's overall progress")
    agents: dict[str, AgentSnapshot]
    result: dict[str, Any] | None
    error: SessionError | None


class SessionEvents(BaseModel):
    """A page of a session's retained events (``GET /api/sessions/{id}/events``)."""

    session_id: str
    gap: bool = Field(
        description="the 'after' position could not be served (trimmed, another epoch, "
        "malformed): the events are the whole retained story, as a stream's replay_gap says"
    )
    more: bool = Field(description="more follow: ask again with 'after' = the last event's id")
    ended: bool = Field(description="the session's final event is stored")
    last_seq: int = Field(ge=0, description="the seq of the newest stored event")
    events: list[dict[str, Any]] = Field(
        description="stored events, oldest first, exactly as the streams carry them "
        "(the AsyncAPI document's messages)"
    )


class PublishAccepted(BaseModel):
    id: str
    seq: int = Field(ge=1)


class Status(BaseModel):
    status: str


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    ErrorBody,
    RunWorkflowAccepted,
    RunWorkflowOutcome,
    WorkflowCancelled,
    SessionSnapshot,
    SessionEvents,
    PublishAccepted,
    Status,
)


def _ref(name: str) -> JsonObject:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JsonObject, description: str) -> JsonObject:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> JsonObject:
    return _json(_ref("Error"), description)


def _components() -> JsonObject:
    schemas: JsonObject = {}
    models: tuple[type[BaseModel], ...] = (RunWorkflowRequest, *RESPONSE_MODELS)
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[schema.get("title", model.__name__)] = schema
    for model in PUBLISHABLE.values():
        schemas[f"Publish{model.__name__}"] = publish_schema(model)
    schemas["PublishEventRequest"] = {
        "oneOf": [_ref(f"Publish{model.__name__}") for model in PUBLISHABLE.values()],
        "discriminator": {
            "propertyName": "type",
            "mapping": {
                str(model.model_fields["type"].default): f"#/components/schemas/Publish"
                f"{model.__name__}"
                for model in PUBLISHABLE.values()
            },
        },
    }
    return schemas


@cache
def _openapi() -> JsonObject:
    session_id = {
        "name": "session_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": SESSION_ID_PATTERN.pattern},
    }
    invalid_session = _error("The session id does not match the pattern.")
    token = {
        "name": "token",
        "in": "query",
        "required": False,
        "schema": _TOKEN_SCHEMA,
    }
    bad_token = _error("Stream tokens are on and the token is missing, invalid or expired.")
    overloaded = _error(
        "The server is busy (a limit is reached) or its event store cannot be reached; "
        "retry after the `Retry-After` header's seconds."
    )
    unavailable = _error("The event store cannot be reached; retry later.")
    not_found = _error("No such session (never started, or expired).")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"{TITLE}: REST API",
            "version": VERSION,
            "description": "Start and cancel workflows, read sessions, publish events. The streams "
            "themselves are described by the AsyncAPI document at `/asyncapi.json`. Every "
            'error body is `{"error", "code", "reference"}`.',
        },
        "paths": {
            "/api/orchestrator/run-workflow": {
                "post": {
                    "operationId": "runWorkflow",
                    "summary": "Start the orchestrator workflow for a session",
                    "description": "Open the session's stream first, then post: the stream "
                    "shows everything from the first event.",
                    "parameters": [
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "`true` answers when the workflow has ended.",
                            "schema": {"type": "string", "enum": ["true", "1", "yes"]},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("RunWorkflowRequest")}},
                    },
                    "responses": {
                        "202": _json(_ref("RunWorkflowAccepted"), "The workflow runs."),
                        "200": _json(_ref("RunWorkflowOutcome"), "With ?wait=true: it ended."),
                        "400": _error("The body is not a JSON object."),
                        "408": _error("The body did not arrive within body_timeout."),
                        "409": _error("This session already ran a workflow."),
                        "413": _error("The body is too large."),
                        "422": _error("The body is valid JSON but not a valid request."),
                        "503": overloaded,
                    },
                }
            },
            "/api/sessions/{session_id}": {
                "get": {
                    "operationId": "getSession",
                    "summary": "A snapshot of a session",
                    "parameters": [session_id, token],
                    "responses": {
                        "200": _json(_ref("SessionSnapshot"), "The session's state."),
                        "400": invalid_session,
                        "401": bad_token,
                        "404": not_found,
                        "503": unavailable,
                    },
                }
            },
            "/api/sessions/{session_id}/cancel": {
                "post": {
                    "operationId": "cancelWorkflow",
                    "summary": "Cancel the session's workflow",
                    "description": "Its subscribers get the final `error` "
                    "`workflow_cancelled`, and its work stops. Cancelling it again gets the "
                    "same answer. Allowed to whoever may watch the session.",
                    "parameters": [session_id, token],
                    "responses": {
                        "200": _json(_ref("WorkflowCancelled"), "The workflow is cancelled."),
                        "400": invalid_session,
                        "401": bad_token,
                        "404": not_found,
                        "409": _error(
                            "The session never had a workflow (`no_workflow`: other "
                            "services publish into it), or it has ended otherwise "
                            "(`session_ended`)."
                        ),
                        "503": unavailable,
                    },
                }
            },
            "/api/sessions/{session_id}/events": {
                "get": {
                    "operationId": "getSessionEvents",
                    "summary": "A session's retained events, page by page",
                    "description": "What a stream's replay would send, for a consumer that "
                    "does not stream.",
                    "parameters": [
                        session_id,
                        token,
                        {
                            "name": "after",
                            "in": "query",
                            "description": "An event id: the events after it (all without).",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "description": "At most this many (100 by default; any "
                            "value over buffer_size is buffer_size). A page also stops "
                            "before its events pass 1 MiB of JSON (one event at least).",
                            "schema": {"type": "integer", "minimum": 1},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("SessionEvents"), "The page."),
                        "400": _error("Invalid session id or limit."),
                        "401": bad_token,
                        "404": not_found,
                        "503": unavailable,
                    },
                },
                "post": {
                    "operationId": "publishEvent",
                    "summary": "Publish one event into a session (for other services)",
                    "description": "The server fills in `session_id`, `timestamp`, `id` and "
                    "`seq`; sending them is an error. With an `Idempotency-Key`, an event "
                    "sent again with its key is stored once: the retry gets the first answer.",
                    "parameters": [
                        session_id,
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "description": "The publisher's name for this event, unique in "
                            "the session; remembered for the session's last `buffer_size` "
                            "keys, for as long as it lives.",
                            "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,128}$"},
                        },
                    ],
                    "security": [{}, {"publishToken": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("PublishEventRequest")}},
                    },
                    "responses": {
                        "202": _json(
                            _ref("PublishAccepted"),
                            "Stored and delivered; or, with `Idempotent-Replayed: true`, "
                            "stored before with this Idempotency-Key (nothing stored now).",
                        ),
                        "400": _error(
                            "Invalid session id, body that is not JSON, or malformed "
                            "Idempotency-Key."
                        ),
                        "401": _error("A publish token is configured and was not given."),
                        "403": _error("No token is configured and the client is not local."),
                        "408": _error("The body did not arrive within body_timeout."),
                        "409": _error("The session has ended."),
                        "413": _error("The body is too large."),
                        "422": _error(
                            "The body is not a valid event, or its Idempotency-Key was used "
                            "for another event in this session."
                        ),
                        "503": overloaded,
                    },
                },
            },
            "/sse/orchestrator/{session_id}": {
                "get": {
                    "operationId": "streamSse",
                    "summary": "The session's stream as Server-Sent Events",
                    "description": "See the AsyncAPI document for the events.",
                    "parameters": [
                        session_id,
                        {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "lastEventId",
                            "in": "query",
                            "description": "An EventSource polyfill's resume position (also "
                            "`lastEventID`): wins over `last_event_id`.",
                            "schema": {"type": "string"},
                        },
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                        token,
                    ],
                    "responses": {
                        "200": {
                            "description": "The stream; it ends after the final event.",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "204": {"description": "Resumed at the final event: nothing follows."},
                        "400": invalid_session,
                        "401": bad_token,
                        "503": overloaded,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness",
                    "responses": {"200": _json(_ref("Status"), "The process serves.")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: the event store is reachable",
                    "responses": {
                        "200": _json(_ref("Status"), "Ready."),
                        "503": _error("The event store cannot be reached."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format 0.0.4.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "publishToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The configured publish token.",
                }
            },
        },
    }


def openapi_document() -> JsonObject:
    """The OpenAPI 3.1 document of the REST endpoints (a fresh copy each call)."""
    return copy.deepcopy(_openapi())


# --- routes ------------------------------------------------------------------------------


async def _asyncapi_handler(request: web.Request) -> web.Response:
    return web.json_response(_asyncapi())


async def _openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(_openapi())


def add_contract_routes(app: web.Application) -> None:
    """``GET /asyncapi.json`` and ``GET /openapi.json``."""
    app.router.add_get("/asyncapi.json", _asyncapi_handler)
    app.router.add_get("/openapi.json", _openapi_handler)
