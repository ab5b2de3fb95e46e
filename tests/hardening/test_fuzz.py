"""Fuzzing with hypothesis against the real app: REST bodies, WebSocket frames,
Last-Event-ID values, session ids and query strings. Never a 5xx, never a crash, never a
connection left behind."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from server.app import create_app
from server.config import Settings
from server.messages import ProgressEvent
from tests.hardening.support import FakeAgents, metric, new_session_id
from tests.hardening.threaded import ThreadedServer
from tests.timing import EVENT_TIMEOUT

MAX_FRAME = 4096
PUBLISH_TOKEN = "fuzz-publish-token"
MAX_BODY = 16 * 1024
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- the server, once for the module ---------------------------------------------------------


class ErrorRecords(logging.Handler):
    """Collects every ERROR record: a handler that fails after its response has begun (a
    WebSocket, a stream) shows no 5xx, only aiohttp's "Error handling request" log line."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def served(errors: ErrorRecords) -> Iterator[ThreadedServer]:
    config = Settings(
        port=0,
        heartbeat_interval=3600.0,
        buffer_size=50,
        max_frame_size=MAX_FRAME,
        max_body_size=MAX_BODY,
        max_strategy_length=500,
        shutdown_grace=0.0,
        publish_token=PUBLISH_TOKEN,
        stream_token_secret=None,
    )
    with ThreadedServer(create_app(config, agents=FakeAgents())) as server:
        yield server
        assert_nothing_left(server)


@pytest.fixture(scope="module")
def story(served: ThreadedServer) -> str:
    """A session with a few stored events, to resume from."""
    session_id = new_session_id()

    async def publish() -> None:
        for n in range(1, 6):
            await served.ctx.hub.publish(
                ProgressEvent(session_id=session_id, agent="demand", status=f"{n}", progress=n)
            )

    served.call(publish)
    return session_id


def assert_nothing_left(server: ThreadedServer) -> None:
    """Every connection closed, every subscription gone, and the server still answers."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        open_streams = sum(
            metric(server.ctx, "orchestrator_connections", transport=t)
            for t in ("websocket", "sse")
        )
        subscribers = server.ctx.hub.subscriber_count
        if open_streams == 0 and subscribers == 0 and server.ctx.admission.connections == 0:
            break
        assert time.monotonic() < deadline, (open_streams, subscribers)
        time.sleep(0.01)
    status, _, _ = request(server, "GET", "/healthz")
    assert status == 200


# --- plain clients --------------------------------------------------------------------------------


def request(
    server: ThreadedServer,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on its own connection. A streaming answer is read up to its first
    bytes, then the connection is dropped."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=EVENT_TIMEOUT)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        if response.getheader("Content-Type", "").startswith("text/event-stream"):
            return response.status, response.headers, response.read1(256)
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def assert_answer(status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
    """No 5xx but a 503 of a limit; every error is the JSON error shape."""
    assert status < 500, (status, body)
    assert "Server" not in headers
    if status >= 400:
        error = json.loads(body)
        assert set(error) == {"error", "code", "reference"}, error


def websocket(server: ThreadedServer, path: str) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{server.port}{path}",
        proxy=None,
        compression=None,
        open_timeout=EVENT_TIMEOUT,
        close_timeout=EVENT_TIMEOUT,
        max_size=None,
    )


def receive(ws: ClientConnection) -> dict[str, Any] | None:
    """The next event, or None once the server has closed."""
    try:
        event: dict[str, Any] = json.loads(ws.recv(timeout=EVENT_TIMEOUT))
    except ConnectionClosed:
        return None
    return event


# --- strategies -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
text_or_json = st.one_of(st.text(max_size=60), json_values)
nasty_segments = st.sampled_from(
    ["%", "%zz", "%00", "..", "%2e%2e", "a%2Fb", "%ff%fe", "%0d%0a", "%20", "~", ";x=1"]
)
session_ids = st.one_of(
    st.text(max_size=140).map(lambda text: urllib.parse.quote(text, safe="")),
    st.from_regex(r"[A-Za-z0-9_-]{8,128}", fullmatch=True),
    nasty_segments,
)
query_strings = st.one_of(
    st.lists(
        st.tuples(
            st.sampled_from(["last_event_id", "token", "wait", "session_id"]) | st.text(max_size=8),
            st.text(max_size=40),
        ),
        max_size=4,
    ).map(lambda pairs: "?" + urllib.parse.urlencode(pairs)),
    st.text(alphabet="&=;%?+/abc019", max_size=20).map(lambda junk: "?" + junk),
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=80,
)
run_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {"strategy_description": text_or_json},
        optional={"session_id": text_or_json | st.from_regex(r"[a-z0-9]{8,20}", fullmatch=True)},
    ).map(lambda value: json.dumps(value).encode()),
)
publish_bodies = st.one_of(
    st.binary(max_size=200),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["progress", "agent_status", "complete", "error", "heartbeat"])},
        optional={
            key: text_or_json
            for key in ("agent", "status", "progress", "data", "final", "code", "error", "id")
        },
    ).map(lambda value: json.dumps(value).encode()),
)
frames = st.lists(
    st.one_of(
        st.text(max_size=100),
        st.binary(max_size=100),
        json_values.map(json.dumps),
        st.just('{"type": "ping"}'),
        st.integers(MAX_FRAME - 2, MAX_FRAME + 2).map(lambda size: "x" * size),
    ),
    min_size=1,
    max_size=5,
)


# --- the fuzz tests --------------------------------------------------------------------------


@FUZZ
@given(body=run_bodies, query=query_strings, content_type=st.sampled_from(["json", "text", None]))
def test_run_workflow_bodies(
    served: ThreadedServer, body: bytes, query: str, content_type: str | None
) -> None:
    """Any body and query to run-workflow: a 2xx, or a 4xx in the JSON error shape."""
    headers = {"Content-Type": f"application/{content_type}"} if content_type else {}
    assert_answer(*request(served, "POST", "/api/orchestrator/run-workflow" + query, body, headers))


@FUZZ
@given(
    body=publish_bodies,
    session_id=session_ids,
    authorization=st.one_of(
        st.just(f"Bearer {PUBLISH_TOKEN}"),
        header_values,
        header_values.map(lambda value: "Bearer " + value),
    ),
)
def test_publish_bodies(
    served: ThreadedServer, body: bytes, session_id: str, authorization: str
) -> None:
    """Any body into any session id, with any Authorization: 202, or a 4xx in the JSON
    error shape."""
    headers = {"Authorization": authorization}
    status, answer_headers, answer = request(
        served, "POST", f"/api/sessions/{session_id}/events", body, headers
    )
    assert_answer(status, answer_headers, answer)
    if authorization != f"Bearer {PUBLISH_TOKEN}":
        assert status in (400, 401, 404)  # a bad session id or path is refused first


@FUZZ
@given(
    origin=header_values,
    token=header_values,
    cookie=header_values,
    upgrade=st.booleans(),
    transport=st.sampled_from(["ws", "sse"]),
)
def test_stream_handshake_headers(
    served: ThreadedServer,
    story: str,
    origin: str,
    token: str,
    cookie: str,
    upgrade: bool,
    transport: str,
) -> None:
    """Any Origin, Cookie and token on a stream handshake (with or without the upgrade
    headers): an upgrade, a stream, or a 4xx; never a 5xx."""
    headers = {"Origin": origin, "Cookie": cookie}
    if upgrade:
        headers |= {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
    query = urllib.parse.urlencode({"token": token})
    status, answer_headers, body = request(
        served, "GET", f"/{transport}/orchestrator/{story}?{query}", headers=headers
    )
    if status != 101:
        assert_answer(status, answer_headers, body)


@FUZZ
@given(session_id=session_ids, query=query_strings)
def test_session_ids_and_queries_over_rest_and_sse(
    served: ThreadedServer, session_id: str, query: str
) -> None:
    """Any session id and query string on the GET endpoints: never a 5xx."""
    for path in (f"/api/sessions/{session_id}", f"/sse/orchestrator/{session_id}"):
        status, headers, body = request(served, "GET", path + query)
        assert_answer(status, headers, body)
        if status == 200 and path.startswith("/sse/"):
            assert body.startswith(b"retry: ")


@FUZZ
@given(value=header_values, as_header=st.booleans())
def test_last_event_id_values(
    served: ThreadedServer, story: str, value: str, as_header: bool
) -> None:
    """Any resume point, as header or query: the stream starts (or 204 at the final event);
    a position that cannot be served starts with ``replay_gap``."""
    if as_header:
        status, headers, body = request(
            served, "GET", f"/sse/orchestrator/{story}", headers={"Last-Event-ID": value}
        )
    else:
        query = urllib.parse.urlencode({"last_event_id": value})
        status, headers, body = request(served, "GET", f"/sse/orchestrator/{story}?{query}")
    assert_answer(status, headers, body)
    assert status == 200 and body.startswith(b"retry: ")


@FUZZ
@given(value=header_values)
def test_last_event_id_values_over_websocket(
    served: ThreadedServer, story: str, value: str
) -> None:
    """Any ``?last_event_id=``: the stream answers a ping, and nothing is skipped silently:
    either the events after a valid position, or ``replay_gap`` then everything."""
    query = urllib.parse.urlencode({"last_event_id": value})
    with websocket(served, f"/ws/orchestrator/{story}?{query}") as ws:
        ws.send('{"type": "ping"}')
        seen = []
        while (event := receive(ws)) is not None and event["type"] != "heartbeat":
            seen.append(event)
        assert event is not None, seen
        if value == "":  # no resume point
            assert [e["seq"] for e in seen] == [1, 2, 3, 4, 5]
        elif seen and seen[0]["type"] == "error":
            assert seen[0]["code"] == "replay_gap"
            assert [e["seq"] for e in seen[1:]] == [1, 2, 3, 4, 5]


@FUZZ
@given(session_id=session_ids, query=query_strings)
def test_session_ids_and_queries_over_websocket(
    served: ThreadedServer, session_id: str, query: str
) -> None:
    """A bad session id gets ``invalid_session_id`` and 1008 (an empty one, no route: 404);
    a good one streams."""
    try:
        ws = websocket(served, f"/ws/orchestrator/{session_id}{query}")
    except InvalidStatus as refused:
        assert refused.response.status_code == 404, refused
        return
    with ws:
        with contextlib.suppress(ConnectionClosed):  # a refused one may be closed already
            ws.send('{"type": "ping"}')
        seen = []
        while (event := receive(ws)) is not None and event["type"] != "heartbeat":
            seen.append(event)
        notices = [e for e in seen if "id" not in e]
        if notices and notices[0]["code"] == "invalid_session_id":
            assert event is None and ws.close_code == 1008
        else:  # stored events of a session the other tests created, then the heartbeat
            assert all(notice["code"] == "replay_gap" for notice in notices), notices
            assert event is not None or ws.close_code == 1000


@FUZZ
@given(sent=frames)
def test_websocket_frames(served: ThreadedServer, sent: list[str | bytes]) -> None:
    """Each frame gets a heartbeat (a ping) or ``invalid_message``, in order, until one is
    over ``max_frame_size``: that one closes with 1009. Never a 1011."""
    with websocket(served, f"/ws/orchestrator/{new_session_id()}") as ws:
        for frame in sent:
            size = len(frame.encode() if isinstance(frame, str) else frame)
            try:
                ws.send(frame)
            except ConnectionClosed:
                break
            event = receive(ws)
            if size > MAX_FRAME:
                assert event is None
                assert ws.close_code == 1009
                return
            assert event is not None
            if _is_ping(frame):
                assert event["type"] == "heartbeat"
            else:
                assert event["type"] == "error" and event["code"] == "invalid_message"


def _is_ping(frame: str | bytes) -> bool:
    if isinstance(frame, bytes):
        return False
    try:
        command = json.loads(frame)
    except (ValueError, RecursionError):
        return False
    return isinstance(command, dict) and command.get("type") == "ping"


def test_after_the_fuzzing_nothing_is_left_open(
    served: ThreadedServer, errors: ErrorRecords
) -> None:
    """Gauges back to 0, no subscription left, the server still answers, and nothing
    failed on the server side (no ERROR in the log)."""
    assert_nothing_left(served)
    assert [record.getMessage() for record in errors.records] == []
