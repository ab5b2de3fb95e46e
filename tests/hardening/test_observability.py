"""Observability: every metric of the list at /metrics and what moves it, /readyz, and
JSON log lines with the session id and reference id."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import resource
from collections.abc import Iterator

import pytest
from aiohttp import ClientSession
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from server.logs import (
    SESSION_ID,
    ContextFilter,
    JsonFormatter,
    MalformedRequestFilter,
    setup_logging,
)
from server.messages import ProgressEvent
from server.metrics import LATENCY_SAMPLE_EVERY
from tests.hardening.clients import (
    assert_error_body,
    next_event,
    read_until_final,
    sse_url,
    url,
    ws_url,
)
from tests.hardening.conftest import StartServer
from tests.hardening.support import FakeAgents, context_of, metric, new_session_id, wait_until

METRICS = (
    "orchestrator_connections",
    "orchestrator_sessions",
    "orchestrator_subscribers",
    "orchestrator_events_published_total",
    "orchestrator_events_delivered_total",
    "orchestrator_replays_total",
    "orchestrator_replay_gaps_total",
    "orchestrator_subscriptions_closed_total",
    "orchestrator_refusals_total",
    "orchestrator_agent_duration_seconds_count",
    "orchestrator_delivery_latency_seconds_count",
    "orchestrator_workflows_total",
)


def progress(session_id: str, n: int) -> ProgressEvent:
    return ProgressEvent(session_id=session_id, agent="demand", status=f"step {n}", progress=n)


async def test_metrics_lists_every_family_in_prometheus_text(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> None:
    """After one workflow and one refusal, /metrics has every metric of the list."""
    server = await start(stream_token_secret="s")
    async with http.post(
        url(server, "/api/orchestrator/run-workflow?wait=true"),
        json={"strategy_description": "chairs"},
    ) as response:
        session_id = (await response.json())["session_id"]
    async with http.get(sse_url(server, session_id, "?token=wrong")) as response:
        assert response.status == 401
    async with http.get(url(server, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    for name in METRICS:
        assert f"\n{name}" in text, name


async def test_process_metrics_show_the_open_files_every_stream_holds(
    start: StartServer, http: ClientSession
) -> None:
    """``process_open_fds`` grows with the open streams (each is a socket) and
    ``process_max_fds`` is the process's limit on open files: what an operator watches
    to raise the limit before the kernel refuses connections."""
    server = await start()
    ctx = context_of(server)
    assert metric(ctx, "process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    before = metric(ctx, "process_open_fds")
    assert before > 0
    streams = 20
    async with contextlib.AsyncExitStack() as opened:
        for _ in range(streams):
            await opened.enter_async_context(http.ws_connect(ws_url(server, new_session_id())))
        await wait_until(
            lambda: metric(ctx, "orchestrator_connections", transport="websocket") == streams
        )
        # The test's clients live in this process too: at least one socket per stream.
        assert metric(ctx, "process_open_fds") >= before + streams
    assert metric(ctx, "process_resident_memory_bytes") > 0


async def test_sessions_gauge_counts_subscribed_running_and_live(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> None:
    """``orchestrator_sessions{state}``: a running workflow, a watched session, and both
    together as ``live``; all back to 0 once they are over."""
    agents.gate = asyncio.Event()
    server = await start()
    ctx = context_of(server)

    def sessions(state: str) -> float:
        return metric(ctx, "orchestrator_sessions", state=state)

    async with http.post(
        url(server, "/api/orchestrator/run-workflow"), json={"strategy_description": "chairs"}
    ) as response:
        running = (await response.json())["session_id"]
    async with http.ws_connect(ws_url(server, new_session_id())):
        await wait_until(lambda: sessions("subscribed") == 1)
        assert sessions("running") == 1 and sessions("live") == 2
        async with http.ws_connect(ws_url(server, running)) as ws:
            await wait_until(lambda: sessions("subscribed") == 2)
            assert sessions("live") == 2
            agents.gate.set()
            await read_until_final(ws)
    await wait_until(lambda: sessions("live") == 0)
    assert sessions("running") == 0 and sessions("subscribed") == 0


async def test_agent_durations_are_observed_by_agent_and_outcome(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> None:
    """Each agent call lands in the duration histogram under its agent and outcome."""
    agents.failure = RuntimeError("boom")
    server = await start()
    ctx = context_of(server)
    async with http.post(
        url(server, "/api/orchestrator/run-workflow?wait=true"),
        json={"strategy_description": "chairs"},
    ) as response:
        assert (await response.json())["status"] == "failed"
    name = "orchestrator_agent_duration_seconds_count"
    assert metric(ctx, name, agent="extraction", outcome="success") == 1
    assert metric(ctx, name, agent="demand", outcome="failed") == 1
    assert metric(ctx, name, agent="inventory", outcome="success") == 0
    assert metric(ctx, "orchestrator_workflows_total", outcome="failed") == 1


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_delivery_latency_is_sampled_for_live_events_only(
    start: StartServer, http: ClientSession, transport: str
) -> None:
    """Live events with seq 1, 17, 33 ... are timed (one subscriber: once each);
    replayed events are not timed; every stored event is counted as delivered."""
    server = await start()
    ctx = context_of(server)
    session_id = new_session_id()
    published = LATENCY_SAMPLE_EVERY + 1  # seq 1 and 17 are sampled

    def latency_count() -> float:
        return metric(ctx, "orchestrator_delivery_latency_seconds_count", transport=transport)

    def delivered() -> float:
        return metric(ctx, "orchestrator_events_delivered_total", transport=transport)

    target = ws_url(server, session_id) if transport == "websocket" else sse_url(server, session_id)
    if transport == "websocket":
        async with http.ws_connect(target) as ws:
            await wait_until(lambda: ctx.hub.subscriber_count == 1)
            for n in range(1, published + 1):
                await ctx.hub.publish(progress(session_id, n))
            for _ in range(published):
                assert await next_event(ws) is not None
    else:
        async with http.get(target) as response:
            await response.content.readline()
            await wait_until(lambda: ctx.hub.subscriber_count == 1)
            for n in range(1, published + 1):
                await ctx.hub.publish(progress(session_id, n))
            await wait_until(lambda: delivered() == published)
    await wait_until(lambda: delivered() == published)
    assert latency_count() == 2
    total = metric(ctx, "orchestrator_delivery_latency_seconds_sum", transport=transport)
    assert 0 <= total < 10

    # A late subscriber replays all of them: delivered, but not timed.
    if transport == "websocket":
        async with http.ws_connect(target) as ws:
            for _ in range(published):
                assert await next_event(ws) is not None
    else:
        async with http.get(target) as response:
            await response.content.readline()
            await wait_until(lambda: delivered() == 2 * published)
    await wait_until(lambda: delivered() == 2 * published)
    assert latency_count() == 2


async def test_readyz_is_503_with_retry_after_when_the_broker_is_unreachable(
    start: StartServer, http: ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz asks the broker: 200 when it answers, 503 + Retry-After when it does not."""
    server = await start()
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 200

    async def unreachable() -> bool:
        return False

    monkeypatch.setattr(context_of(server).hub.broker, "ping", unreachable)
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) > 0
        assert_error_body(await response.json(), "service_unavailable")


# --- logs ----------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Records of the ``server`` loggers as JSON lines, into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("server")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_a_json_line_carries_the_session_and_reference_when_known(
    json_log: io.StringIO,
) -> None:
    """Session id from the context, reference from ``extra``, the traceback as text."""
    log = logging.getLogger("server.test")
    token = SESSION_ID.set("session-0001")
    try:
        try:
            raise ValueError("inner detail")
        except ValueError:
            log.exception("it failed [ref %s]", "abc123", extra={"reference": "abc123"})
    finally:
        SESSION_ID.reset(token)
    log.warning("no context")
    first, second = (json.loads(line) for line in json_log.getvalue().splitlines())
    assert first["session_id"] == "session-0001" and first["reference"] == "abc123"
    assert first["level"] == "ERROR" and first["logger"] == "server.test"
    assert first["message"] == "it failed [ref abc123]"
    assert "ValueError: inner detail" in first["exception"]
    assert "session_id" not in second and "reference" not in second


def test_setup_logging_writes_text_by_default_and_json_on_request() -> None:
    """``--log-format text`` (the default) keeps the classic line; ``json`` one object."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for fmt in ("text", "json"):
            stream = io.StringIO()
            setup_logging("INFO", fmt, stream=stream)
            logging.getLogger("server.x").info("hello %s", "there")
            line = stream.getvalue().strip()
            if fmt == "text":
                assert line.endswith("INFO server.x: hello there")
            else:
                assert json.loads(line)["message"] == "hello there"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


async def test_a_failing_agent_is_logged_with_its_session_and_reference(
    start: StartServer, http: ClientSession, agents: FakeAgents, json_log: io.StringIO
) -> None:
    """The agent's log line names the session and the reference that its ``error`` event
    shows to users, so one can be found from the other."""
    agents.failure = RuntimeError("boom")
    server = await start()
    async with http.post(
        url(server, "/api/orchestrator/run-workflow?wait=true"),
        json={"strategy_description": "chairs"},
    ) as response:
        body = await response.json()
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    [failure] = [r for r in records if r["message"].startswith("agent demand failed [ref")]
    assert failure["session_id"] == body["session_id"]
    assert failure["reference"] and failure["reference"] in failure["message"]
    async with http.get(url(server, f"/api/sessions/{body['session_id']}")) as response:
        snapshot = json.dumps(await response.json())
    assert failure["reference"] in snapshot  # the user sees the same reference


async def test_a_request_log_line_names_the_session_of_that_request_only(
    start: StartServer, http: ClientSession, json_log: io.StringIO
) -> None:
    """A refusal logged while handling a stream request names that request's session, and
    the next request on the same keep-alive connection names its own."""
    server = await start(max_connections_per_session=1)
    first, second = new_session_id(), new_session_id()
    async with http.get(sse_url(server, first)), http.get(sse_url(server, second)):
        for session_id in (first, second, first):
            async with http.get(sse_url(server, session_id)) as refused:
                assert refused.status == 503
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    refusals = [r for r in records if " -> 503: " in r["message"]]
    assert [r.get("session_id") for r in refusals] == [first, second, first]


async def test_a_handshake_offering_subprotocols_is_not_a_warning(
    start: StartServer, http: ClientSession
) -> None:
    """A client offering WebSocket subprotocols (the server knows none) is served without
    one; aiohttp's warning about it, twice per handshake that any client may repeat, is
    kept at DEBUG, out of an INFO log."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        setup_logging("INFO", "json", stream=stream)
        server = await start()
        for _ in range(3):
            target = url(server, f"/ws/orchestrator/{new_session_id()}", "ws")
            async with http.ws_connect(target, protocols=("graphql-ws", "mqtt")) as ws:
                assert ws.protocol is None
        assert "Client protocols" not in stream.getvalue()
        setup_logging("DEBUG", "json", stream=stream)
        async with http.ws_connect(target, protocols=("graphql-ws",)):
            pass
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        offered = [r for r in records if "Client protocols" in r["message"]]
        assert offered and {r["level"] for r in offered} == {"DEBUG"}
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def aiohttp_server_error(error: Exception, msg: str, *args: object) -> logging.LogRecord:
    """The record aiohttp's server logs for ``error``: ERROR, with its traceback."""
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, msg, args, (type(error), error, None)
    )


def test_a_malformed_request_is_one_info_line_not_an_error_with_a_traceback() -> None:
    """aiohttp's ERROR + traceback for a client's malformed HTTP becomes a one-line INFO;
    a real server error stays an ERROR."""
    log_filter = MalformedRequestFilter()
    bad = BadHttpMessage("Invalid header token:\n\n  b'Bad Header'")
    record = aiohttp_server_error(bad, "Error handling request from %s", "127.0.0.1")
    assert log_filter.filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == (
        "Error handling request from 127.0.0.1: 400 Invalid header token:"
    )
    token = "sk-live-0123456789abcdef"
    too_long = LineTooLong(f"Authorization: Bearer {token}".encode(), 8190)
    record = aiohttp_server_error(too_long, "Error handling request from %s", "127.0.0.1")
    assert log_filter.filter(record)
    assert record.getMessage() == (
        "Error handling request from 127.0.0.1: 400 Got more than 8190 bytes when reading"
    )
    assert token[:8] not in record.getMessage()
    record = aiohttp_server_error(RuntimeError("a bug"), "Error handling request")
    assert log_filter.filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
