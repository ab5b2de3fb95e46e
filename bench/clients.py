"""The load generator's sockets: subscribers (WebSocket, SSE) and a raw HTTP publisher.

Every published event carries ``data = {"t": <time.time_ns() at publish>,
"n": <per-session counter>, "p": <phase>}`` (the publisher lives in this very
process). Each subscriber keeps a :class:`Tally`: which ``n`` it has seen
(loss, duplicates, order) and the publish-to-receive latency of every
delivery, filed under the phase the event was published in.

Two receive times are kept. The raw subscribers read their sockets with
``recvmsg`` and ``SO_TIMESTAMPNS``: the kernel's time of arrival of the bytes
on the subscriber's socket, which does not depend on when this process got
round to reading them (with 1,000 sockets to read, a Python client takes
milliseconds to go round them all). That is the latency reported. The time
the client code saw the event is kept too (``app_latencies``).

Bookkeeping is kept cheap (a regex over the frame, no JSON decoding) so that
the load generator, not the server, stays the lighter side.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp

HOST = "127.0.0.1"
# The three numbers the publisher writes into ``data``, in that order, in every server's JSON.
EVENT_RE = re.compile(rb'"t":\s*(\d+),\s*"n":\s*(\d+),\s*"p":\s*(\d+)')
EVENT_STR_RE = re.compile(r'"t":\s*(\d+),\s*"n":\s*(\d+),\s*"p":\s*(\d+)')
ID_STR_RE = re.compile(r'"id":\s*"([^"]*)"')
ID_RE = re.compile(rb'"id":\s*"([^"]*)"')
CODE_RE = re.compile(rb'"code":\s*"([^"]*)"')
CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
CHUNKED_RE = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)


class Phase:
    """Deliveries and their latencies for the events published in one phase."""

    __slots__ = ("app_latencies", "arrivals", "deliveries", "latencies")

    def __init__(self) -> None:
        self.deliveries = 0
        self.latencies = array("q")  # to the kernel's arrival time on the client socket
        self.app_latencies = array("q")  # to the time the client code saw the event
        # (session, n) -> [publish time, first arrival, last arrival] over its subscribers
        self.arrivals: dict[tuple[int, int], list[int]] = {}

    def spreads(self) -> tuple[list[int], list[int]]:
        """Per event: publish to its first arrival, and first to last arrival (the time
        the server took to go round its subscribers), in ns."""
        first = [a[1] - a[0] for a in self.arrivals.values()]
        spread = [a[2] - a[1] for a in self.arrivals.values()]
        return first, spread


class Recorder:
    """Shared by every subscriber of one scenario run."""

    def __init__(self, phases: int) -> None:
        self.phases = [Phase() for _ in range(phases)]
        self.deliveries = 0  # stored events received, any phase
        self.controls: dict[str, int] = {}  # control events (no ``n``) by type or error code

    def control(self, kind: str) -> None:
        self.controls[kind] = self.controls.get(kind, 0) + 1


class Tally:
    """What one subscriber received, across all its connections (a resume keeps its tally)."""

    __slots__ = (
        "connections",
        "done_at",
        "dups",
        "last_id",
        "last_n",
        "open",
        "received",
        "recorder",
        "reordered",
        "seen",
        "session",
        "target_n",
    )

    def __init__(self, recorder: Recorder, session: int) -> None:
        self.recorder = recorder
        self.session = session
        self.seen = bytearray(64)
        self.last_n = 0
        self.received = 0
        self.dups = 0
        self.reordered = 0
        self.last_id: str | None = None
        self.target_n = 0  # storm: the replay is complete once ``last_n`` reaches this
        self.done_at = 0
        self.open = False
        self.connections = 0

    def on_event(self, t: int, n: int, p: int, arrived: int, now: int) -> None:
        seen = self.seen
        if n >= len(seen):
            seen.extend(bytes(max(n + 1 - len(seen), len(seen))))
        if seen[n]:
            self.dups += 1
            return
        seen[n] = 1
        if n < self.last_n:
            self.reordered += 1
        else:
            self.last_n = n
        self.received += 1
        phase = self.recorder.phases[p]
        phase.deliveries += 1
        phase.latencies.append(arrived - t)
        phase.app_latencies.append(now - t)
        key = (self.session, n)
        seen_at = phase.arrivals.get(key)
        if seen_at is None:
            phase.arrivals[key] = [t, arrived, arrived]
        elif arrived < seen_at[1]:
            seen_at[1] = arrived
        elif arrived > seen_at[2]:
            seen_at[2] = arrived
        self.recorder.deliveries += 1
        if self.target_n and not self.done_at and self.last_n >= self.target_n:
            self.done_at = now

    def count_between(self, first: int, last: int) -> int:
        """How many distinct ``n`` in ``first..last`` were received."""
        if last < first:
            return 0
        return self.seen[first : last + 1].count(1)


# --- WebSocket subscriber (aiohttp client) ----------------------------------------------


async def ws_subscribe(
    session: aiohttp.ClientSession,
    url: str,
    tally: Tally,
    connected: asyncio.Future[None],
    want_id: bool = False,
) -> None:
    """Hold one WebSocket until the server or the scenario closes it; tally what arrives."""
    recorder = tally.recorder
    try:
        ws = await session.ws_connect(url, autoping=True, max_msg_size=0, compress=0)
    except BaseException as exc:
        if not connected.done():
            connected.set_exception(exc)
        raise
    tally.open = True
    tally.connections += 1
    if not connected.done():
        connected.set_result(None)
    search = EVENT_STR_RE.search
    time_ns = time.time_ns
    try:
        async for message in ws:  # ends when the connection closes
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            now = time_ns()
            data = message.data
            found = search(data)
            if found is None:
                recorder.control(_control_kind(data.encode()))
                continue
            if want_id:
                event_id = ID_STR_RE.search(data)
                if event_id is not None:
                    tally.last_id = event_id.group(1)
            tally.on_event(int(found[1]), int(found[2]), int(found[3]), now, now)
    finally:
        tally.open = False
        await ws.close()


def _control_kind(payload: bytes) -> str:
    code = CODE_RE.search(payload)
    if code is not None:
        return "error:" + code.group(1).decode(errors="replace")
    kind = re.search(rb'"type":\s*"([^"]*)"', payload)
    return kind.group(1).decode(errors="replace") if kind else "unknown"


# --- raw sockets read with the kernel's arrival time -----------------------------------

# Python 3.11's socket module does not name it; Linux's value is 35 (SCM_TIMESTAMPNS too).
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0
_READ_SIZE = 262144


class TimestampedSocket:
    """The little of a transport the raw clients need, over a non-blocking socket read
    with ``recvmsg`` from the event loop's reader callback, so that every read comes
    with ``SO_TIMESTAMPNS``: when the kernel received those bytes (CLOCK_REALTIME)."""

    def __init__(self, sock: socket.socket, client: RawWSClient | SSEClient) -> None:
        self.sock = sock
        self.client = client
        self.loop = asyncio.get_running_loop()
        self._closed = False

    def start(self) -> None:
        self.client.connection_made(self)  # type: ignore[arg-type]
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lose(exc)
            return
        if sent < len(data):  # rare: only small requests and control frames are written
            self.loop.create_task(self.loop.sock_sendall(self.sock, data[sent:]))

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.client.connection_lost(exc)

    def _readable(self) -> None:
        for _ in range(16):  # bounded: let the other sockets have their turn
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(_READ_SIZE, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(exc)
                return
            if not data:
                self._lose(None)
                return
            now = time.time_ns()
            arrived = now
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                    arrived = seconds * 1_000_000_000 + nanoseconds
            self.client.feed(data, arrived, now)
            if self._closed or len(data) < _READ_SIZE:
                return


async def connect(client: RawWSClient | SSEClient, port: int) -> None:
    """Connect ``client`` to the server, with timestamped reads where the OS has them."""
    loop = asyncio.get_running_loop()
    if _SO_TIMESTAMPNS is None or not _ANCILLARY:
        await loop.create_connection(lambda: client, HOST, port)
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    TimestampedSocket(sock, client).start()


# --- WebSocket subscriber (raw frames on a raw socket) ----------------------------------


class RawWSClient(asyncio.Protocol):
    """One WebSocket on a raw socket: the upgrade, then frames parsed in ``data_received``.

    No task wakes up per message (unlike the aiohttp client), so the load
    generator spends a few microseconds per delivery. Server frames are
    unmasked text frames; pings are answered, a close frame is echoed.
    """

    def __init__(self, path: str, tally: Tally, want_id: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.tally = tally
        self.want_id = want_id
        self.headers_done: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        key = base64.b64encode(os.urandom(16)).decode()
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self._buf = bytearray()
        self._fragments = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.tally.open = False
        if not self.headers_done.done():
            self.headers_done.set_exception(exc or ConnectionResetError("closed before upgrade"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        """Send a close frame (1000) and drop the socket."""
        if self.transport is not None and not self.transport.is_closing():
            self.send(0x8, b"\x03\xe8")
            self.transport.close()

    def send(self, opcode: int, payload: bytes) -> None:
        """One masked client frame (payloads here are short control frames)."""
        assert self.transport is not None and len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        self.feed(data, now, now)

    def feed(self, data: bytes, arrived: int, now: int) -> None:
        """Bytes that arrived on the socket at ``arrived`` and are read at ``now`` (ns)."""
        buf = self._buf
        buf += data
        if not self.headers_done.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(buf[9:12])
            del buf[: end + 4]
            self.headers_done.set_result(status)
            if status != 101:
                assert self.transport is not None
                self.transport.close()
                return
            self.tally.open = True
            self.tally.connections += 1
        pos = 0
        size = len(buf)
        tally = self.tally
        search = EVENT_RE.search
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if second & 0x80:
                head += 4  # a masked server frame is a protocol error; read past it anyway
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = first & 0x0F
            if not first & 0x80 or opcode == 0:
                self._fragments += payload
                if not first & 0x80:
                    continue
                payload = bytes(self._fragments)
                self._fragments.clear()
                opcode = 1
            if opcode == 1:
                found = search(payload)
                if found is None:
                    tally.recorder.control(_control_kind(payload))
                    continue
                if self.want_id:
                    event_id = ID_RE.search(payload)
                    if event_id is not None:
                        tally.last_id = event_id.group(1).decode()
                tally.on_event(int(found[1]), int(found[2]), int(found[3]), arrived, now)
            elif opcode == 0x9:
                self.send(0xA, payload[:125])
            elif opcode == 0x8:
                self.close()
        if pos:
            del buf[:pos]


async def raw_ws_subscribe(
    port: int, path: str, tally: Tally, want_id: bool = False
) -> RawWSClient:
    """Open one WebSocket; returns once the server answered 101."""
    client = RawWSClient(path, tally, want_id)
    await connect(client, port)
    status = await client.headers_done
    if status != 101:
        raise ConnectionError(f"WebSocket upgrade answered {status}")
    return client


# --- SSE subscriber (raw stream parse) ------------------------------------------------


class SSEClient(asyncio.Protocol):
    """One ``GET /sse/...`` on a raw socket: headers, optional chunked coding, SSE blocks."""

    def __init__(self, path: str, tally: Tally, last_event_id: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.tally = tally
        self.headers_done: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        head = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n"
        if last_event_id:
            head += f"Last-Event-ID: {last_event_id}\r\n"
        self._request = (head + "\r\n").encode()
        self._head = bytearray()
        self._chunked = False
        self._raw = bytearray()  # undecoded chunked bytes
        self._chunk_left = 0
        self._need_crlf = False
        self._text = bytearray()  # decoded event-stream bytes not yet parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.tally.open = False
        if not self.headers_done.done():
            self.headers_done.set_exception(exc or ConnectionResetError("closed before headers"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        self.feed(data, now, now)

    def feed(self, data: bytes, arrived: int, now: int) -> None:
        """Bytes that arrived on the socket at ``arrived`` and are read at ``now`` (ns)."""
        if not self.headers_done.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._head[:end])
            data = bytes(self._head[end + 4 :])
            self._head.clear()
            status = int(head[9:12])
            self._chunked = CHUNKED_RE.search(head) is not None
            self.headers_done.set_result(status)
            if status != 200:
                assert self.transport is not None
                self.transport.close()
                return
            self.tally.open = True
            self.tally.connections += 1
        if self._chunked:
            data = self._dechunk(data)
        self._text += data
        self._parse(arrived, now)

    def _dechunk(self, data: bytes) -> bytes:
        buf = self._raw
        buf += data
        out: list[bytes] = []
        pos = 0
        size_limit = len(buf)
        while pos < size_limit:
            if self._chunk_left:
                take = min(self._chunk_left, size_limit - pos)
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self._chunk_left -= take
                if not self._chunk_left:
                    self._need_crlf = True
                continue
            if self._need_crlf:
                if size_limit - pos < 2:
                    break
                pos += 2
                self._need_crlf = False
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(bytes(buf[pos:end]).split(b";")[0], 16)
            pos = end + 2
            if size == 0:
                pos = size_limit  # last chunk: the stream is over
                break
            self._chunk_left = size
        del buf[:pos]
        return b"".join(out)

    def _parse(self, arrived: int, now: int) -> None:
        text = self._text
        if b"\r" in text:
            text[:] = text.replace(b"\r\n", b"\n")
        start = 0
        tally = self.tally
        search = EVENT_RE.search
        while True:
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            block = bytes(text[start:end])
            start = end + 2
            found = search(block)
            if found is None:
                if b"data:" in block:
                    tally.recorder.control(_control_kind(block))
                continue
            if block.startswith(b"id:"):
                tally.last_id = block[3 : block.index(b"\n")].strip().decode()
            tally.on_event(int(found[1]), int(found[2]), int(found[3]), arrived, now)
        if start:
            del text[:start]


async def sse_subscribe(
    port: int, path: str, tally: Tally, last_event_id: str | None = None
) -> SSEClient:
    """Open one SSE stream; returns once the response headers arrived (status 200)."""
    client = SSEClient(path, tally, last_event_id)
    await connect(client, port)
    status = await client.headers_done
    if status != 200:
        raise ConnectionError(f"SSE answered {status}")
    return client


# --- publisher (raw HTTP/1.1 keep-alive, pipelined) -------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; requests may be pipelined, answers come back in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self._buf = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(exc or ConnectionResetError("publisher connection closed"))

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        if self.lost or self.transport is None:
            future.set_exception(ConnectionResetError("publisher connection closed"))
            return future
        self.pending.append(future)
        self.transport.write(raw)
        return future

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[: end + 2])
            length = CONTENT_LENGTH_RE.search(head)
            if length is None:
                raise RuntimeError("the publish answer has no Content-Length")
            total = end + 4 + int(length.group(1))
            if len(buf) < total:
                return
            status = int(head[9:12])
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            if self.pending:
                future = self.pending.popleft()
                if not future.done():
                    future.set_result((status, body))


class Publisher:
    """Publishes events over ``connections`` keep-alive sockets.

    Session ``i`` always goes over socket ``i % connections``, and a server
    answers the requests of one socket in order, so each session's events are
    published in order (``n`` = 1, 2, 3 ...).
    """

    def __init__(self, port: int, session_ids: list[str], connections: int) -> None:
        self.port = port
        self.session_ids = session_ids
        self.paths = [f"/api/sessions/{sid}/events".encode() for sid in session_ids]
        self.n = [0] * len(session_ids)  # last ``n`` published per session
        self.connection_count = max(1, min(connections, len(session_ids)))
        self.connections: list[HttpConnection] = []
        self.in_flight: set[asyncio.Future[tuple[int, bytes]]] = set()
        self.published = 0
        self.failed = 0  # non-2xx answers or broken connections
        self.statuses: dict[int, int] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.connection_count):
            _, conn = await loop.create_connection(HttpConnection, HOST, self.port)
            self.connections.append(conn)

    async def reconnect(self) -> None:
        """Reopen connections the server closed (uvicorn drops idle keep-alives after 5 s)."""
        loop = asyncio.get_running_loop()
        for i, conn in enumerate(self.connections):
            if conn.lost:
                _, self.connections[i] = await loop.create_connection(
                    HttpConnection, HOST, self.port
                )

    def close(self) -> None:
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()

    def publish(self, session: int, phase: int) -> asyncio.Future[tuple[int, bytes]]:
        """Publish the session's next event now; returns the future of the answer."""
        n = self.n[session] = self.n[session] + 1
        body = (
            b'{"type":"progress","agent":"bench","status":"benchmark event","progress":1,'
            b'"data":{"t":%d,"n":%d,"p":%d}}' % (time.time_ns(), n, phase)
        )
        raw = (
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (self.paths[session], len(body), body)
        )
        future = self.connections[session % self.connection_count].request(raw)
        self.published += 1
        self.in_flight.add(future)
        future.add_done_callback(self._answered)
        return future

    def _answered(self, future: asyncio.Future[tuple[int, bytes]]) -> None:
        self.in_flight.discard(future)
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
            return
        status = future.result()[0]
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if not 200 <= status < 300:
            self.failed += 1

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for every answer still due."""
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=timeout)


async def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.005) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds passed; returns the last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


JSON = dict[str, Any]
