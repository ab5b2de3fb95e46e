"""The REST endpoints: start and cancel a workflow, read a session and its events, publish an
event, health, metrics."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError

from .auth import check_stream_access, issue_stream_token
from .brokers.base import IdempotencyKey, Repeated, Replay, SessionInfo
from .context import STREAM_CONTEXT, StreamContext
from .errors import (
    BodyTimeout,
    InvalidRequest,
    InvalidSessionId,
    Overloaded,
    ServiceUnavailable,
    SessionNotFound,
    StreamError,
    Unauthorized,
)
from .limits import Ticket
from .messages import (
    CONTROL_ERROR_CODES,
    PUBLISHABLE_ADAPTER,
    SESSION_ID_PATTERN,
    CompleteEvent,
    ErrorEvent,
    StorableEvent,
    is_valid_session_id,
)
from .query import query_value
from .snapshot import session_snapshot
from .workflow import WorkflowOutcome, WorkflowRunner, session_exists, wait_outcome

WORKFLOW_RUNNER = web.AppKey("workflow_runner", WorkflowRunner)
log = logging.getLogger(__name__)

T = TypeVar("T")
# Tasks seen through after their request was cancelled: held here until done, since the
# event loop keeps only weak references to tasks (see asyncio.shield's documentation).
_SEEN_THROUGH: set[asyncio.Task[Any]] = set()


async def seen_through(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, which goes on to its end even if the request is cancelled meanwhile
    (its client hung up): a write to the store that has begun must be acted on."""
    task = asyncio.ensure_future(work)
    _SEEN_THROUGH.add(task)
    task.add_done_callback(_SEEN_THROUGH.discard)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_unanswered_failure)  # no client left to tell
        raise


def _log_unanswered_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled() or (failure := task.exception()) is None:
        return
    if isinstance(failure, StreamError):  # what the client would have been answered
        log.warning("after its client hung up, a request failed: %s", failure.message)
    else:
        log.error("after its client hung up, a request failed", exc_info=failure)


class RunWorkflowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy_description: str = Field(min_length=1)
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN.pattern)


def describe_validation_error(error: ValidationError) -> str:
    """A readable, internals-free summary of what is wrong with the input."""
    problems = []
    for item in error.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "Invalid request: " + "; ".join(problems) + "."


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a clear 400. Size is capped by ``client_max_size``,
    time by ``body_timeout``: a body that never finishes would hold its connection (and
    a file descriptor) for as long as its client likes, and no connection limit counts
    REST requests.

    JSON is UTF-8 (RFC 8259), so the raw bytes are read as UTF-8 whatever charset
    the Content-Type names (a leading byte order mark is read past): bytes that do not
    decode (``UnicodeDecodeError`` is a ``ValueError``), a bogus charset, a body in
    UTF-16 or UTF-32 and nesting deeper than the parser's recursion limit are all "not
    valid JSON", never a 500.
    """
    try:
        if request.content.is_eof():
            # All of it came with the headers (a published event mostly does): no timer,
            # which would cost a publish a twentieth of its time.
            raw = await request.read()
        else:
            async with asyncio.timeout(request.app[STREAM_CONTEXT].settings.body_timeout):
                raw = await request.read()
    except TimeoutError:
        raise BodyTimeout() from None
    except RequestPayloadError:  # a body its Content-Encoding (gzip, deflate) does not decode
        raise InvalidRequest(
            "The request body does not decode as its Content-Encoding says.", code="invalid_body"
        ) from None
    try:
        # Decoded here, not by json.loads(bytes), which would guess UTF-16 or UTF-32.
        body = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Only an escape ("\ud800") makes a lone surrogate: UTF-8 cannot carry one. A body
    # without "\u" (most of them) is not walked.
    if b"\\u" in raw and _holds_lone_surrogate(body):
        raise InvalidRequest(
            "The request body holds a lone surrogate escape (such as \\ud800), which is "
            "not text: escape characters beyond U+FFFF as a pair, or send them as UTF-8.",
            status=422,
        )
    return body


def _holds_lone_surrogate(body: dict[str, Any]) -> bool:
    """Whether a key or a string anywhere in ``body`` holds a lone UTF-16 surrogate (the
    parser joins a pair into one character). Values would fail when the event is written
    as JSON, but keys would be written as U+FFFD: stored altered, without a word."""
    pending: list[Any] = [body]
    while pending:  # a loop, not recursion: the body may be nested as deep as it parsed
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


_SURROGATE = re.compile("[\ud800-\udfff]")


# The session id in a route. An empty one matches too (aiohttp's default needs a
# character), so that it is refused as an invalid session id (400, or 1008 on a
# WebSocket, which tells a client to stop), not answered 404 (a WebSocket client sees
# 1006 and reconnects for ever).
SESSION_ID_SEGMENT = "{session_id:[^{}/]*}"


def session_id_of(request: web.Request) -> str:
    session_id = request.match_info["session_id"]
    if not is_valid_session_id(session_id):
        raise InvalidSessionId()
    return session_id


async def _exists(ctx: StreamContext, session_id: str) -> bool:
    """Whether the event store has the session: ``False`` too when it cannot say soon (a
    refusal under load must stay cheap)."""
    try:
        async with asyncio.timeout(_EXISTS_TIMEOUT):
            return await ctx.hub.broker.info(session_id) is not None
    except (ServiceUnavailable, TimeoutError):
        return False


_EXISTS_TIMEOUT = 0.5  # seconds


def stream_urls(session_id: str) -> dict[str, str]:
    return {
        "websocket": f"/ws/orchestrator/{session_id}",
        "sse": f"/sse/orchestrator/{session_id}",
    }


async def run_workflow(request: web.Request) -> web.Response:
    ctx = request.app[STREAM_CONTEXT]
    body = await read_json_object(request)
    try:
        run = RunWorkflowRequest.model_validate(body)
    except ValidationError as error:
        raise InvalidRequest(describe_validation_error(error), status=422) from None
    if len(run.strategy_description) > ctx.settings.max_strategy_length:
        ctx.metrics.refused("strategy_too_long")
        raise InvalidRequest(
            f"strategy_description is longer than {ctx.settings.max_strategy_length} characters.",
            status=422,
        )
    session_id = run.session_id or str(uuid.uuid4())
    try:
        ticket = ctx.admission.workflow(session_id)
    except Overloaded as overloaded:
        # At max_sessions. A session that exists can never run again, whatever the load:
        # 409, not a 503 that would have its client retry in vain. (Only a client's own
        # id may exist; if the store cannot say, the refusal stands as it is.)
        if run.session_id is not None and await _exists(ctx, session_id):
            raise session_exists() from None
        raise overloaded
    # Seen through once begun: a client that hangs up (its handler cancelled) while the
    # store is claiming the session must not leave it claimed with nothing running it.
    runner = request.app[WORKFLOW_RUNNER]
    task = await seen_through(_start(runner, ticket, session_id, run.strategy_description))
    secret = ctx.settings.stream_token_secret
    token = {}
    if secret is not None:
        token["token"] = issue_stream_token(secret, session_id, ctx.settings.stream_token_ttl)
    if request.query.get("wait", "").lower() not in ("1", "true", "yes"):
        return web.json_response(
            {
                "session_id": session_id,
                "status": "running",
                "stream": stream_urls(session_id),
                **token,
            },
            status=202,
        )
    outcome = await wait_outcome(task)
    body_out: dict[str, Any] = {
        "session_id": session_id,
        "status": outcome.status,
        "result": outcome.result,
        "stream": stream_urls(session_id),
        **token,
    }
    if outcome.error is not None:
        body_out["error"] = outcome.error
    return web.json_response(body_out)


async def _start(
    runner: WorkflowRunner, ticket: Ticket, session_id: str, strategy: str
) -> asyncio.Task[WorkflowOutcome]:
    """Start the workflow, which holds ``ticket`` (its place among the live sessions)
    until it ends."""
    try:
        task = await runner.start(session_id, strategy)
    except BaseException:
        ticket.release()
        raise
    task.add_done_callback(lambda _: ticket.release())
    return task


async def cancel_workflow(request: web.Request) -> web.Response:
    """Cancel the session's workflow: its subscribers get the final ``error``
    ``workflow_cancelled`` and its work stops (:meth:`WorkflowRunner.cancel`). Allowed
    to whoever may watch the session: the starter of the workflow."""
    session_id = _watched_session(request)
    # Seen through once begun, as a publish is: a cancel stored must stop the work.
    await seen_through(request.app[WORKFLOW_RUNNER].cancel(session_id))
    return web.json_response({"session_id": session_id, "status": "cancelled"})


def _watched_session(request: web.Request) -> str:
    """The session of the request's path, for a client allowed to watch it (its stream
    token, when tokens are on); 400 or 401 otherwise."""
    session_id = session_id_of(request)
    check_stream_access(request, request.app[STREAM_CONTEXT].settings, session_id)
    return session_id


async def _retained(
    request: web.Request, after: str | None = None, limit: int | None = None
) -> tuple[str, Replay, SessionInfo]:
    """The session of the request's path and its retained events after ``after`` (see
    :meth:`Hub.read_after`), for a client allowed to watch it; 404 without a session."""
    session_id = _watched_session(request)
    replay = await request.app[STREAM_CONTEXT].hub.read_after(session_id, after, limit)
    if replay.info is None:
        raise SessionNotFound()
    return session_id, replay, replay.info


async def get_session(request: web.Request) -> web.Response:
    session_id, replay, info = await _retained(request)
    return web.json_response(await session_snapshot(session_id, info, replay.events))


async def get_events(request: web.Request) -> web.Response:
    """The session's retained events after ``?after=`` (an event id; from the oldest
    without one), oldest first: the replay a stream would send, for a consumer that does
    not stream. At most ``?limit=`` of them (``_PAGE_EVENTS`` by default, at most
    ``buffer_size``) and ``_PAGE_BYTES`` of their JSON (one event at least), so that a
    page costs little memory, and on Redis one bounded read. ``gap``: the position could
    not be served (trimmed, another epoch, malformed), so the events are the whole
    retained story, as a stream's ``replay_gap`` says; ``more``: ask again with
    ``after`` set to the last event's id."""
    buffer_size = request.app[STREAM_CONTEXT].settings.buffer_size
    limit = _limit(query_value(request, "limit"), min(_PAGE_EVENTS, buffer_size), buffer_size)
    after = query_value(request, "after")
    session_id, replay, info = await _retained(request, after, limit + 1)  # one more: `more`
    events = replay.events[:limit]
    size = 0
    for n, event in enumerate(events):
        size += len(event.payload)
        if size > _PAGE_BYTES and n > 0:
            events = events[:n]
            break
    # Built around the stored events' own JSON, each encoded once when it was stored.
    head = json.dumps(
        {
            "session_id": session_id,
            "gap": replay.gap,
            "more": len(replay.events) > len(events),
            "ended": info.ended,
            "last_seq": info.last_seq,
        }
    )
    body = b"".join(
        (head[:-1].encode(), b', "events": [', b", ".join(e.payload for e in events), b"]}")
    )
    return web.Response(body=body, content_type="application/json")


# A page of GET /api/sessions/{id}/events: so many events by default, and at most so many
# bytes of their JSON (events of up to max_body_size each, a whole buffer of them, could
# otherwise make one request hold hundreds of megabytes).
_PAGE_EVENTS = 100
_PAGE_BYTES = 1 << 20


def _limit(text: str | None, default: int, most: int) -> int:
    """``?limit=``: a whole number from 1, at most ``most``; ``default`` when absent.
    More is a page of ``most`` (the page says ``more``), as a page is never over 1 MiB."""
    if text is None:
        return default
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit() and digits):
        raise InvalidRequest(f"'limit' must be a whole number from 1 (pages hold up to {most}).")
    # Compared by length first: int() refuses strings of over 4,300 digits.
    return most if len(digits) > len(str(most)) else min(int(digits), most)


# Headers a reverse proxy adds: a request that carries one was relayed for someone else,
# so a loopback peer address says nothing about where it came from.
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def _may_publish(request: web.Request, token: str | None) -> bool:
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # surrogateescape: header bytes that are not UTF-8 compare as the bytes they are.
        given_bytes = given.encode("utf-8", "surrogateescape")
        expected = token.encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, expected)
    if any(name in request.headers for name in _PROXY_HEADERS):
        return False
    return _is_loopback(request.remote or "")


@functools.lru_cache(maxsize=256)  # a publisher sends many events from one address
def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def publish_event(request: web.Request) -> web.Response:
    ctx = request.app[STREAM_CONTEXT]
    session_id = session_id_of(request)
    if not _may_publish(request, ctx.settings.publish_token):
        if ctx.settings.publish_token is None:
            raise Unauthorized(
                "Publishing is only allowed from this machine unless a publish token is set.",
                code="forbidden",
                status=403,
            )
        raise Unauthorized("A valid 'Authorization: Bearer <publish token>' header is required.")
    body = await read_json_object(request)
    for server_field in ("session_id", "timestamp", "id", "seq"):
        if server_field in body:
            raise InvalidRequest(
                f"'{server_field}' is filled in by the server; leave it out.", status=422
            )
    try:
        event = PUBLISHABLE_ADAPTER.validate_python({**body, "session_id": session_id})
    except ValidationError as error:
        raise InvalidRequest(describe_validation_error(error), status=422) from None
    if isinstance(event, ErrorEvent) and event.code in CONTROL_ERROR_CODES:
        raise InvalidRequest(
            f"'{event.code}' is a code the server sends to one connection; an error to store "
            "needs a code of its own.",
            status=422,
        )
    key = _idempotency_key(request, event)
    storing = _store(ctx, request.app[WORKFLOW_RUNNER], event, key)
    if isinstance(event, CompleteEvent | ErrorEvent) and event.final:
        # Seen through once begun: a publisher that hangs up (its handler cancelled) while
        # the store is answering must not leave its event stored and a workflow running
        # on. Only a final event has work after its store; a task for every event cost
        # 3 % of the many-sessions benchmark's deliveries (docs/BENCHMARKS.md).
        return await seen_through(storing)
    return await storing


async def _store(
    ctx: StreamContext, runner: WorkflowRunner, event: StorableEvent, key: IdempotencyKey | None
) -> web.Response:
    try:
        stored = await ctx.hub.publish(event, key)
        answer = _published(stored.id, stored.seq)
    except Repeated as first:
        # Sent before and stored then: the same answer, and nothing stored again.
        answer = _published(first.id, first.seq, {"Idempotent-Replayed": "true"})
    except PydanticSerializationError:
        # The event is written as JSON before anything is stored. What passes validation
        # but cannot be written is in `data`, whose values are any JSON: nesting deeper
        # than the encoder goes.
        raise _unwritable_data() from None
    if isinstance(event, CompleteEvent | ErrorEvent) and event.final:
        # The session has ended: a workflow running it here stops now, as for a cancel
        # (elsewhere, at its process's next lease renewal). Sent again too, in case the
        # first request never got this far.
        runner.ended(event)
    return answer


def _unwritable_data() -> InvalidRequest:
    return InvalidRequest(
        "'data' cannot be written as JSON: it is nested too deep.",
        status=422,
    )


def _published(id: str, seq: int, headers: dict[str, str] | None = None) -> web.Response:
    # Built by hand, not json.dumps'd: an id is "<hex epoch>-<seq>", nothing to escape, and
    # this answer is the one response per published event.
    answer = f'{{"id":"{id}","seq":{seq}}}'.encode()
    return web.Response(body=answer, status=202, content_type="application/json", headers=headers)


# Visible ASCII and spaces: UUIDs, ULIDs, and the draft standard's quoted strings.
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,128}")


def _idempotency_key(request: web.Request, event: StorableEvent) -> IdempotencyKey | None:
    """The publisher's ``Idempotency-Key`` (IETF draft-ietf-httpapi-idempotency-key-header),
    with a digest of the event it names: the event as validated, less the timestamp the
    server fills in, with the fields of every object in one order, so that the same
    event sent again, however its JSON is laid out, is the same event."""
    keys = request.headers.getall("Idempotency-Key", [])
    if not keys:
        return None
    if len(keys) > 1 or not _IDEMPOTENCY_KEY.fullmatch(keys[0]):
        raise InvalidRequest(
            "Send one Idempotency-Key header, of 1 to 128 printable ASCII characters.",
            code="invalid_idempotency_key",
        )
    try:
        fields = event.model_dump(mode="json", exclude={"timestamp"})
        content = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, RecursionError):  # pydantic's "maximum serialization depth"
        raise _unwritable_data() from None
    return IdempotencyKey(keys[0], hashlib.blake2b(content, digest_size=16).hexdigest())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[STREAM_CONTEXT]
    if not await ctx.hub.broker.ping():
        raise ServiceUnavailable("The event store is not reachable.")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[STREAM_CONTEXT]
    return web.Response(
        body=ctx.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/orchestrator/run-workflow", run_workflow)
    app.router.add_get(f"/api/sessions/{SESSION_ID_SEGMENT}", get_session)
    app.router.add_post(f"/api/sessions/{SESSION_ID_SEGMENT}/cancel", cancel_workflow)
    app.router.add_post(f"/api/sessions/{SESSION_ID_SEGMENT}/events", publish_event)
    app.router.add_get(f"/api/sessions/{SESSION_ID_SEGMENT}/events", get_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
