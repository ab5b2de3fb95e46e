"""Real clients for the transport, API and end-to-end tests.

* WebSocket through two independent libraries, behind one small interface
  (:class:`WSClient`): aiohttp's client (:class:`AiohttpWS`) and the ``websockets``
  library (:class:`WebsocketsWS`).
* Server-Sent Events through a raw parse of the byte stream (:class:`SSEParser`), read
  with aiohttp (:class:`AiohttpSSE`) and with ``curl -N`` as a subprocess (:class:`CurlSSE`).
* Bodies to publish, publishing over REST, bounded waits, metric samples.

Every read is bounded by a timeout from :mod:`tests.timing`; nothing here sleeps to
synchronise except :func:`wait_until`, which polls a real condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from aiohttp import (
    ClientResponse,
    ClientSession,
    ClientWebSocketResponse,
    TCPConnector,
    WSMsgType,
    web,
)
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as websockets_connect
from websockets.exceptions import ConnectionClosed
from yarl import URL

from server.context import STREAM_CONTEXT
from tests.timing import EVENT_TIMEOUT, POLL_INTERVAL, WORKFLOW_TIMEOUT

Event = dict[str, Any]
# The aiohttp test client of our app (the fixtures' ``client``).
AppClient = TestClient[web.Request, web.Application]

STRATEGY = "15% off outdoor furniture for 8 weeks"
FRONTEND_ORIGIN = "http://localhost:5173"
AGENTS = ("extraction", "demand", "inventory", "pricing")


def new_session_id() -> str:
    return str(uuid.uuid4())


def app_of(server: BaseTestServer) -> web.Application:
    """The app a test server runs (``client.server`` is typed as aiohttp's base class)."""
    assert isinstance(server, TestServer)
    app: web.Application = server.app
    return app


def http_url(server: BaseTestServer, path: str) -> URL:
    """An absolute URL; ``path`` is taken as already percent-encoded (so ``%00`` stays)."""
    return URL(f"http://{server.host}:{server.port}{path}", encoded=True)


def ws_url(server: BaseTestServer, path: str) -> str:
    return f"ws://{server.host}:{server.port}{path}"


# --- bounded waits ----------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], bool], what: str, timeout: float = EVENT_TIMEOUT
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(POLL_INTERVAL)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


# --- what to publish --------------------------------------------------------------------------


def progress(n: int, agent: str = "demand") -> Event:
    """The body of a ``progress`` event, numbered ``n`` in its ``status``."""
    return {"type": "progress", "agent": agent, "status": f"step {n}", "progress": n % 101}


def final(result: Any = None) -> Event:
    """The body of the orchestrator's final ``complete``."""
    return {
        "type": "complete",
        "agent": "orchestrator",
        "status": "Forecast ready",
        "data": {"result": result if result is not None else {"ok": True}},
        "final": True,
    }


async def publish(client: AppClient, session_id: str, body: Event) -> Event:
    """Publish one event through ``POST /api/sessions/{id}/events``; return ``{id, seq}``."""
    response = await client.post(f"/api/sessions/{session_id}/events", json=body)
    text = await response.text()
    assert response.status == 202, f"{response.status}: {text}"
    answer: Event = json.loads(text)
    return answer


async def publish_story(client: AppClient, session_id: str, count: int) -> list[Event]:
    """``count`` progress events then the final one; the ``{id, seq}`` of each, in order."""
    stored = [await publish(client, session_id, progress(n)) for n in range(1, count + 1)]
    stored.append(await publish(client, session_id, final()))
    return stored


# --- what streams carry -----------------------------------------------------------------------


def stored(events: list[Event]) -> list[Event]:
    """The stored events (those with an ``id``), without heartbeats and control errors."""
    return [event for event in events if "id" in event]


def ids(events: list[Event]) -> list[str]:
    return [event["id"] for event in stored(events)]


def seqs(events: list[Event]) -> list[int]:
    return [event["seq"] for event in stored(events)]


def is_control_error(event: Event | None, code: str) -> bool:
    """A control ``error`` event with ``code``: sent to one connection, so no id and no seq."""
    return (
        event is not None
        and event["type"] == "error"
        and event["code"] == code
        and "id" not in event
        and "seq" not in event
    )


def assert_whole_story(events: list[Event], session_id: str, count: int) -> None:
    """``events`` hold exactly seq 1..count of ``session_id``, in order, ending with final."""
    story = stored(events)
    assert [event["seq"] for event in story] == list(range(1, count + 1))
    assert {event["session_id"] for event in events} == {session_id}
    assert len(set(ids(story))) == count
    assert story[-1].get("final") is True
    assert not any(event.get("final") for event in story[:-1])


# Session ids that are not valid, as they appear in a URL path (percent-encoded).
BAD_SESSION_IDS = {
    # A frontend whose id is still unset: refused (WebSocket 1008, stop), not a 404 (1006,
    # which a client retries for ever).
    "empty": "",
    "too short": "abc1234",
    "too long": "a" * 129,
    "with an encoded slash": "abcdefgh%2Fijkl",
    "with a dot": "abcdefgh.ijkl",
    "with unicode": quote("s\u00e9ssion-0001"),
    "with a NUL": "abcdefgh%00",
    "with a space": "abcd%20efghijk",
}

# Resume ids that cannot be a position: each gets replay_gap, then the whole story.
JUNK_EVENT_IDS = {
    "a dash": "-",
    "three dashes": "1-1-1",
    "negative": "-5",
    "a negative seq": "abcd1234--5",
    "seq zero": "abcd1234-0",
    "letters": "not-an-id",
    "unicode": "\u00e9poch-3",
    "a non-ASCII digit": "abcd1234-\u0663",
    "long": "a" * 4000 + "-1",
    "huge seq": "abcd1234-" + "9" * 40,
}


class EventStream(Protocol):
    async def next_event(self, timeout: float = EVENT_TIMEOUT) -> Event | None:
        """The next event; ``None`` once the server has ended the stream."""
        ...


async def read_events(
    stream: EventStream, count: int, timeout: float = EVENT_TIMEOUT
) -> list[Event]:
    """Exactly the next ``count`` events (heartbeats included); fails if the stream ends."""
    events: list[Event] = []
    for _ in range(count):
        event = await stream.next_event(timeout)
        assert event is not None, f"the stream ended after {events!r}"
        events.append(event)
    return events


async def read_until(
    stream: EventStream, condition: Callable[[Event], bool], timeout: float = EVENT_TIMEOUT
) -> list[Event]:
    """Events up to and including the first that meets ``condition``."""
    events: list[Event] = []
    while True:
        event = await stream.next_event(timeout)
        assert event is not None, f"the stream ended after {events!r}"
        events.append(event)
        if condition(event):
            return events


async def read_to_end(stream: EventStream, timeout: float = WORKFLOW_TIMEOUT) -> list[Event]:
    """Every event until the server ends the stream, within ``timeout`` overall."""
    events = []
    async with asyncio.timeout(timeout):
        while (event := await stream.next_event(timeout)) is not None:
            events.append(event)
    return events


async def publish_until_slow_consumer_is_cut(
    server: BaseTestServer, session_id: str, fast: EventStream, limit: int = 2000
) -> tuple[int, list[Event]]:
    """Publish big events (so a reader that stopped fills its socket buffers after a few
    megabytes) until the server has cut a slow consumer off, reading each one from
    ``fast`` as it goes. Returns how many were published and what ``fast`` read."""
    from server.messages import ProgressEvent  # the hub's own event type

    hub = app_of(server)[STREAM_CONTEXT].hub
    fast_events: list[Event] = []
    published = 0
    while metric(server, "orchestrator_subscriptions_closed_total", reason="slow_consumer") == 0:
        assert published < limit, "the slow subscriber was never closed"
        published += 1
        await hub.publish(
            ProgressEvent(
                session_id=session_id,
                agent="demand",
                status=f"step {published}",
                progress=1,
                data={"blob": secrets.token_hex(8000)},
            )
        )
        fast_events += await read_events(fast, 1)
    return published, fast_events


# --- WebSocket --------------------------------------------------------------------------------


class WSClient(EventStream, Protocol):
    """What the WebSocket tests need from a client library."""

    library: str

    async def send_text(self, text: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    @property
    def close_code(self) -> int | None: ...

    def abort(self) -> None:
        """Drop the TCP connection with no close frame, as a crashed client would."""
        ...


class AiohttpWS:
    """aiohttp's WebSocket client."""

    library = "aiohttp"

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def next_event(self, timeout: float = EVENT_TIMEOUT) -> Event | None:
        message = await self.ws.receive(timeout=timeout)
        if message.type is WSMsgType.TEXT:
            event: Event = json.loads(message.data)
            return event
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return None
        raise AssertionError(f"expected one text frame per event, got {message.type.name}")

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def abort(self) -> None:
        connection = self.ws._response.connection
        assert connection is not None and connection.transport is not None
        connection.transport.abort()


class WebsocketsWS:
    """The ``websockets`` library's asyncio client."""

    library = "websockets"

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send_text(self, text: str) -> None:
        await self.ws.send(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send(data)

    async def next_event(self, timeout: float = EVENT_TIMEOUT) -> Event | None:
        try:
            async with asyncio.timeout(timeout):
                data = await self.ws.recv()
        except ConnectionClosed:
            return None
        assert isinstance(data, str), "expected one text frame per event, got a binary one"
        event: Event = json.loads(data)
        return event

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def abort(self) -> None:
        self.ws.transport.abort()


@contextlib.asynccontextmanager
async def open_aiohttp_ws(session: ClientSession, url: str) -> AsyncIterator[AiohttpWS]:
    async with session.ws_connect(URL(url, encoded=True), max_msg_size=4 * 2**20) as ws:
        yield AiohttpWS(ws)


@contextlib.asynccontextmanager
async def open_websockets_ws(url: str, **options: Any) -> AsyncIterator[WebsocketsWS]:
    options = {"max_size": 4 * 2**20, "proxy": None, "open_timeout": EVENT_TIMEOUT} | options
    async with websockets_connect(url, **options) as ws:
        yield WebsocketsWS(ws)


# --- slow clients -----------------------------------------------------------------------------

SLOW_RECEIVE_BUFFER = 4096  # bytes; setting it turns off the kernel's receive-buffer autotuning


def small_window_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A TCP socket with a tiny receive window: once its owner stops reading, the server's
    socket backs up after a few megabytes instead of tens (aiohttp's ``socket_factory``)."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECEIVE_BUFFER)
    return sock


def slow_session() -> ClientSession:
    """An aiohttp session whose connections have a tiny receive window (close it!)."""
    return ClientSession(connector=TCPConnector(socket_factory=small_window_socket))


@contextlib.asynccontextmanager
async def open_slow_ws(library: str, url: str) -> AsyncIterator[WSClient]:
    """A WebSocket client that reads only when asked, on a tiny TCP window: while the test
    does not read, the server cannot write to it for long."""
    if library == "aiohttp":
        async with slow_session() as session, open_aiohttp_ws(session, url) as ws:
            yield ws
        return
    host, port = URL(url).host, URL(url).port
    sock = small_window_socket((socket.AF_INET, socket.SOCK_STREAM, 0, "", ()))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    # max_queue=1: the library stops reading the socket as soon as one frame waits.
    async with open_websockets_ws(url, sock=sock, max_queue=1) as ws:
        yield ws


# --- Server-Sent Events -----------------------------------------------------------------------


@dataclass(frozen=True)
class SSEMessage:
    """One dispatched block of a text/event-stream: its fields, in the order written."""

    fields: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [value for field, value in self.fields if field == name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(field for field, _ in self.fields)

    @property
    def id(self) -> str | None:
        found = self.values("id")
        return found[-1] if found else None

    @property
    def event(self) -> str | None:
        found = self.values("event")
        return found[-1] if found else None

    @property
    def retry(self) -> int | None:
        found = self.values("retry")
        return int(found[-1]) if found else None

    @property
    def data(self) -> str | None:
        found = self.values("data")
        return "\n".join(found) if found else None

    def json(self) -> Event:
        assert self.data is not None, f"no data in {self!r}"
        event: Event = json.loads(self.data)
        return event


_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """The text/event-stream grammar (WHATWG HTML, "Interpreting an event stream"):
    lines end in CRLF, CR or LF; ``:`` starts a comment; ``field: value`` with one
    optional space after the colon; a blank line dispatches the block."""

    def __init__(self) -> None:
        self._buffer = b""
        self._fields: list[tuple[str, str]] = []
        self.comments: list[str] = []

    def feed(self, data: bytes) -> list[SSEMessage]:
        self._buffer += data
        messages = []
        while (match := _EOL.search(self._buffer)) is not None:
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # could be the first half of a CRLF: wait for more
            line = self._buffer[: match.start()].decode()
            self._buffer = self._buffer[match.end() :]
            if not line:
                if self._fields:
                    messages.append(SSEMessage(tuple(self._fields)))
                self._fields = []
            elif line.startswith(":"):
                self.comments.append(line[1:])
            else:
                name, _, value = line.partition(":")
                self._fields.append((name, value.removeprefix(" ")))
        return messages

    @property
    def unfinished(self) -> bool:
        """Bytes or fields received but never dispatched (a truncated message)."""
        return bool(self._buffer or self._fields)


class SSEStream:
    """What both SSE clients share: parse bytes into messages, hand out events."""

    status: int
    headers: CIMultiDictProxy[str] | CIMultiDict[str]

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.raw = bytearray()
        self.messages: list[SSEMessage] = []  # every message handed out so far
        self._pending: deque[SSEMessage] = deque()

    async def _read_chunk(self) -> bytes:
        raise NotImplementedError

    async def next_message(self, timeout: float = EVENT_TIMEOUT) -> SSEMessage | None:
        """The next dispatched message; ``None`` once the response has ended."""
        async with asyncio.timeout(timeout):
            while not self._pending:
                chunk = await self._read_chunk()
                if not chunk:
                    assert not self.parser.unfinished, "the response ended inside a message"
                    return None
                self.raw += chunk
                self._pending.extend(self.parser.feed(chunk))
        message = self._pending.popleft()
        self.messages.append(message)
        return message

    async def read_body(self, timeout: float = EVENT_TIMEOUT) -> bytes:
        """The rest of the response body, unparsed (for error responses)."""
        body = bytearray()
        async with asyncio.timeout(timeout):
            while chunk := await self._read_chunk():
                body += chunk
        return bytes(body)

    async def next_event(self, timeout: float = EVENT_TIMEOUT) -> Event | None:
        """The next event (a message with data, e.g. not the ``retry:`` one), checking that
        its ``id:`` line and ``event:`` line agree with its JSON."""
        while (message := await self.next_message(timeout)) is not None:
            if message.data is None:
                continue
            event = message.json()
            assert message.event == event["type"], message
            assert message.id == event.get("id"), message
            return event
        return None


class AiohttpSSE(SSEStream):
    """An SSE response read with aiohttp, parsed by :class:`SSEParser`."""

    def __init__(self, response: ClientResponse) -> None:
        super().__init__()
        self.response = response
        self.status = response.status
        self.headers = response.headers

    async def _read_chunk(self) -> bytes:
        return await self.response.content.readany()

    def abort(self) -> None:
        """Drop the TCP connection, as a crashed client would."""
        connection = self.response.connection
        assert connection is not None and connection.transport is not None
        connection.transport.abort()


@contextlib.asynccontextmanager
async def open_aiohttp_sse(
    session: ClientSession, url: URL | str, headers: Mapping[str, str] | None = None
) -> AsyncIterator[AiohttpSSE]:
    async with session.get(url, headers=headers) as response:
        yield AiohttpSSE(response)


class CurlSSE(SSEStream):
    """``curl -N`` (no buffering) as a subprocess; its output parsed as it arrives."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        super().__init__()
        self.process = process
        self._body_start = b""

    async def _read_head(self, timeout: float) -> None:
        """Parse curl's ``--include`` output: the status line and headers."""
        assert self.process.stdout is not None
        head = b""
        async with asyncio.timeout(timeout):
            while b"\r\n\r\n" not in head:
                chunk = await self.process.stdout.read(4096)
                if not chunk:
                    stderr = await self._stderr()
                    raise AssertionError(f"curl printed no response head: {head!r} {stderr}")
                head += chunk
        head, _, self._body_start = head.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        self.headers = headers

    async def _read_chunk(self) -> bytes:
        if self._body_start:
            chunk, self._body_start = self._body_start, b""
            return chunk
        assert self.process.stdout is not None
        return await self.process.stdout.read(4096)

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode(errors="replace")

    async def exit_code(self, timeout: float = EVENT_TIMEOUT) -> int:
        """curl's exit status once it has finished (0: the server ended the response)."""
        async with asyncio.timeout(timeout):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def open_curl_sse(
    url: URL | str,
    headers: Mapping[str, str] | None = None,
    head_timeout: float = EVENT_TIMEOUT,
    extra_args: tuple[str, ...] = (),
) -> AsyncIterator[CurlSSE]:
    """Run ``curl -N --include <url>``; always reaped on exit (terminated if still running)."""
    args = ["curl", "-N", "--silent", "--show-error", "--include", "--noproxy", "*"]
    args += ["--max-time", str(WORKFLOW_TIMEOUT), *extra_args]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    args.append(str(url))
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stream = CurlSSE(process)
        await stream._read_head(head_timeout)
        yield stream
    finally:
        if process.returncode is None:
            process.terminate()
        await process.communicate()


# --- metrics ----------------------------------------------------------------------------------


def metric(server: BaseTestServer, name: str, **labels: str) -> float:
    """The current value of one sample of the server's metrics (0 if never set)."""
    registry = app_of(server)[STREAM_CONTEXT].metrics.registry
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def connections(server: BaseTestServer) -> dict[str, float]:
    """The connection gauge, by transport."""
    return {
        transport: metric(server, "orchestrator_connections", transport=transport)
        for transport in ("websocket", "sse")
    }
