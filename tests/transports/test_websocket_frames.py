"""RFC 6455 on the server's own WebSocket protocol, frame by frame: pings and pongs, dead
peers, messages in pieces, the close handshake both ways, broken frames.

The client speaks over a raw socket through the ``websockets`` library's sans-I/O
protocol, which parses the server's frames and builds the client's, and sends nothing
on its own: the test decides whether a ping gets its pong, or a close its answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import BaseTestServer
from websockets.frames import Close, CloseCode, Opcode
from websockets.frames import Frame as WireFrame
from websockets.protocol import Protocol, Side

from server.config import Settings
from tests.clients import (
    AppClient,
    final,
    metric,
    new_session_id,
    progress,
    publish,
    wait_until,
)
from tests.conftest import ClientFactory
from tests.hardening.support import RawConnection, context_of
from tests.timing import EVENT_TIMEOUT, QUIET_HEARTBEAT_INTERVAL
from tests.transports.conftest import subscribed, ws_path

CLOSED_BY_SERVER = "orchestrator_subscriptions_closed_total"
# Long enough that a pong sent at once is never late on a loaded machine.
PING_INTERVAL = 0.5
# The largest ping a client may send (a control frame carries at most 125 bytes), masked
# as a client's must be; sent many times over by the tests of clients that do not read.
PING_DATA = bytes(125)
LARGEST_PING = WireFrame(Opcode.PING, PING_DATA).serialize(mask=True)


class RawWebSocket:
    """One WebSocket client, frame by frame."""

    def __init__(self, connection: RawConnection) -> None:
        self.connection = connection
        self.protocol = Protocol(Side.CLIENT, max_size=None)
        self.frames: deque[WireFrame] = deque()  # parsed, not yet asked for

    async def next_frame(self) -> WireFrame | None:
        """The server's next frame; ``None`` once the server has closed the socket."""
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not self.frames:
                data = await self.connection.reader.read(65536)
                if not data:
                    return None
                self.protocol.receive_data(data)
                for event in self.protocol.events_received():
                    assert isinstance(event, WireFrame)
                    self.frames.append(event)
        return self.frames.popleft()

    async def next_of(self, opcode: Opcode) -> WireFrame:
        """Skip the server's other frames (heartbeat events, pings) up to one of ``opcode``."""
        while (frame := await self.next_frame()) is not None:
            if frame.opcode is opcode:
                return frame
        raise AssertionError(f"the server closed the socket before a {opcode.name} frame")

    async def next_event(self) -> dict[str, object]:
        frame = await self.next_of(Opcode.TEXT)
        event: dict[str, object] = json.loads(bytes(frame.data))
        return event

    async def next_stored_event(self) -> dict[str, object]:
        """The next event with an id: heartbeats skipped."""
        while (event := await self.next_event())["type"] == "heartbeat":
            pass
        return event

    async def closed_by_server(self) -> None:
        """Nothing more than frames, then the end of the socket."""
        while await self.next_frame() is not None:
            pass

    def send_queued(self) -> None:
        """Write what the protocol has queued: the client's frames, its pongs and its
        answer to a close."""
        for data in self.protocol.data_to_send():
            if data:
                self.connection.writer.write(data)

    def forget_queued(self) -> None:
        """A client that leaves the server's pings unanswered."""
        self.protocol.data_to_send()


RawWSOpener = Callable[[BaseTestServer, str], Awaitable[RawWebSocket]]


@pytest.fixture
async def open_raw_ws() -> AsyncIterator[RawWSOpener]:
    """``await open_raw_ws(server, path)``: a raw WebSocket, dropped at the test's end."""
    opened: list[RawConnection] = []

    async def open_(server: BaseTestServer, path: str) -> RawWebSocket:
        connection = await RawConnection.open(server)
        opened.append(connection)
        assert await connection.websocket(path) == 101
        return RawWebSocket(connection)

    yield open_
    for connection in opened:
        connection.abort()


async def raw_ws(open_raw_ws: RawWSOpener, client: AppClient, session_id: str) -> RawWebSocket:
    return await open_raw_ws(client.server, ws_path(session_id))


def close_of(frame: WireFrame) -> Close:
    assert frame.opcode is Opcode.CLOSE, frame
    return Close.parse(frame.data)


# --- pings ------------------------------------------------------------------------------------


async def test_a_ping_frame_gets_a_pong_with_its_data(
    make_client: ClientFactory, settings: Settings, open_raw_ws: RawWSOpener
) -> None:
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    ws = await raw_ws(open_raw_ws, client, new_session_id())
    ws.protocol.send_ping(b"are you there")
    ws.send_queued()
    pong = await ws.next_of(Opcode.PONG)
    assert pong.data == b"are you there"


async def test_a_peer_that_answers_pings_stays_and_one_that_stops_is_dropped(
    make_client: ClientFactory, settings: Settings, open_raw_ws: RawWSOpener
) -> None:
    """The server pings every heartbeat interval (PROTOCOL.md). A peer that answers stays
    connected and streaming; one that sends nothing for a whole interval after a ping, not
    even the pong, is dropped, and its subscription is gone."""
    client = await make_client(settings.replace(heartbeat_interval=PING_INTERVAL))
    session_id = new_session_id()
    ws = await raw_ws(open_raw_ws, client, session_id)
    for n in (1, 2, 3):
        await ws.next_of(Opcode.PING)
        ws.send_queued()  # the pong websockets queued
        await publish(client, session_id, progress(n))
        assert (await ws.next_stored_event())["seq"] == n
    await ws.next_of(Opcode.PING)
    ws.forget_queued()
    await ws.closed_by_server()
    await subscribed(client, 0)


async def test_any_frame_from_the_peer_shows_it_is_alive(
    make_client: ClientFactory, settings: Settings, open_raw_ws: RawWSOpener
) -> None:
    """A client that answers no ping but keeps sending commands is alive: it stays."""
    client = await make_client(settings.replace(heartbeat_interval=PING_INTERVAL))
    session_id = new_session_id()
    ws = await raw_ws(open_raw_ws, client, session_id)
    for _ in range(3):
        await ws.next_of(Opcode.PING)
        ws.forget_queued()
        ws.protocol.send_text(b'{"type": "ping"}')
        ws.send_queued()
    await publish(client, session_id, final())
    assert (await ws.next_stored_event())["seq"] == 1
    assert close_of(await ws.next_of(Opcode.CLOSE)).code == CloseCode.NORMAL_CLOSURE


# --- messages ---------------------------------------------------------------------------------


async def test_a_ping_command_in_pieces_is_one_message(
    make_client: ClientFactory, settings: Settings, open_raw_ws: RawWSOpener
) -> None:
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    session_id = new_session_id()
    ws = await raw_ws(open_raw_ws, client, session_id)
    ws.protocol.send_text(b'{"type"', fin=False)
    ws.protocol.send_ping(b"between the pieces")  # a control frame may come in between
    for _ in range(1000):
        ws.protocol.send_continuation(b"", fin=False)  # empty pieces are pieces too
    ws.protocol.send_continuation(b': "pi', fin=False)
    ws.protocol.send_continuation(b'ng"}', fin=True)
    ws.send_queued()
    assert (await ws.next_of(Opcode.PONG)).data == b"between the pieces"
    answer = await ws.next_event()
    assert answer["type"] == "heartbeat" and answer["session_id"] == session_id


async def test_a_message_over_max_frame_size_in_pieces_closes_1009(
    make_client: ClientFactory, settings: Settings, open_raw_ws: RawWSOpener
) -> None:
    """The limit is on the whole message, not on each piece."""
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    ws = await raw_ws(open_raw_ws, client, new_session_id())
    half = settings.max_frame_size // 2 + 1
    ws.protocol.send_text(secrets.token_bytes(half), fin=False)
    ws.protocol.send_continuation(secrets.token_bytes(half), fin=True)
    ws.send_queued()
    assert close_of(await ws.next_of(Opcode.CLOSE)).code == CloseCode.MESSAGE_TOO_BIG
    await ws.closed_by_server()
    await subscribed(client, 0)


# An unmasked text frame "hi": clients must mask theirs.
UNMASKED = b"\x81\x02hi"
# A masked frame of opcode 3, which RFC 6455 reserves, empty, with mask key 0.
RESERVED_OPCODE = b"\x83\x80\x00\x00\x00\x00"
# A ping without FIN: control frames may not come in pieces.
PING_IN_PIECES = b"\x09\x80\x00\x00\x00\x00"
# A last continuation frame "x" with no message begun.
CONTINUATION_OF_NOTHING = b"\x80\x81\x00\x00\x00\x00x"


def _not_utf8(ws: RawWebSocket) -> None:
    ws.protocol.send_text(b"\xff\xfe not UTF-8")


BROKEN_FRAMES: dict[str, tuple[bytes | Callable[[RawWebSocket], None], CloseCode]] = {
    "text that is not UTF-8": (_not_utf8, CloseCode.INVALID_DATA),
    "a continuation of nothing": (CONTINUATION_OF_NOTHING, CloseCode.PROTOCOL_ERROR),
    "an unmasked frame": (UNMASKED, CloseCode.PROTOCOL_ERROR),
    "a reserved opcode": (RESERVED_OPCODE, CloseCode.PROTOCOL_ERROR),
    "a ping in pieces": (PING_IN_PIECES, CloseCode.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("case", list(BROKEN_FRAMES))
async def test_a_broken_frame_closes_with_the_rfc_code_and_other_streams_go_on(
    make_client: ClientFactory, settings: Settings, open_raw_ws: RawWSOpener, case: str
) -> None:
    """The server sends its close frame with RFC 6455's code for the fault, closes the
    socket at once (the connection has failed: no answer is awaited), and forgets the
    subscription; another subscriber of the session still gets every event."""
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    session_id = new_session_id()
    other = await raw_ws(open_raw_ws, client, session_id)
    ws = await raw_ws(open_raw_ws, client, session_id)
    send, code = BROKEN_FRAMES[case]
    if isinstance(send, bytes):
        ws.connection.writer.write(send)
    else:
        send(ws)
        ws.send_queued()
    assert close_of(await ws.next_of(Opcode.CLOSE)).code == code
    await ws.closed_by_server()
    await subscribed(client, 1)
    await publish(client, session_id, final())
    assert (await other.next_stored_event())["seq"] == 1
    assert close_of(await other.next_of(Opcode.CLOSE)).code == CloseCode.NORMAL_CLOSURE


async def test_a_client_that_asks_faster_than_it_reads_is_cut_off(
    make_client: ClientFactory, settings: Settings
) -> None:
    """A burst of pings, more than ``subscriber_queue_size``, from a client that reads
    nothing: at most that many answers wait for it, then it is closed as a slow consumer,
    long before a stuck send would time out (an hour here). What a client sends never
    grows the server's memory without bound."""
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    connection = await RawConnection.open(client.server, receive_buffer=4096)
    try:
        assert await connection.websocket(ws_path(new_session_id())) == 101
        await subscribed(client, 1)
        ws = RawWebSocket(connection)
        for _ in range(20 * settings.subscriber_queue_size):
            ws.protocol.send_text(b'{"type": "ping"}')
        ws.send_queued()
        await wait_until(
            lambda: metric(client.server, CLOSED_BY_SERVER, reason="slow_consumer") == 1,
            "the client cut off as a slow consumer",
        )
    finally:
        connection.abort()
    await subscribed(client, 0)


async def test_a_client_that_pings_without_reading_is_not_read_until_it_reads(
    make_client: ClientFactory, settings: Settings
) -> None:
    """Every ping frame calls for a pong. A client that sends pings and reads nothing is
    no longer read once its pongs back up past the socket's high-water mark, so what
    waits for it stays bounded however much it sends. Once it reads again, every pong
    comes, and the stream goes on."""
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    session_id = new_session_id()
    connection = await RawConnection.open(client.server, receive_buffer=4096)
    try:
        assert await connection.websocket(ws_path(session_id)) == 101
        await subscribed(client, 1)
        [stream] = context_of(client.server).streams
        ws = RawWebSocket(connection)
        # 19 MiB of pongs: more than both kernels' socket buffers take in before the
        # server's own buffer fills.
        pings = 160_000
        connection.writer.write(LARGEST_PING * pings)
        await wait_until(lambda: not stream.reading, "the server stops reading the client")
        assert stream.backlog < 1024 * 1024
        for _ in range(pings):
            assert (await ws.next_of(Opcode.PONG)).data == PING_DATA
        await publish(client, session_id, progress(1))
        assert (await ws.next_stored_event())["seq"] == 1
        assert stream.reading
    finally:
        connection.abort()
    await subscribed(client, 0)


async def test_a_client_that_keeps_sending_but_never_reads_is_dropped(
    make_client: ClientFactory, settings: Settings
) -> None:
    """Sending does not keep a connection that never reads: like any client that stops
    reading, it is dropped within two heartbeat intervals, when its heartbeat cannot be
    sent or its pongs stop coming."""
    client = await make_client(settings.replace(heartbeat_interval=PING_INTERVAL))
    connection = await RawConnection.open(client.server, receive_buffer=4096)

    async def ping_for_ever() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                connection.writer.write(LARGEST_PING * 1000)
                await connection.writer.drain()

    try:
        assert await connection.websocket(ws_path(new_session_id())) == 101
        await subscribed(client, 1)
        pinging = asyncio.create_task(ping_for_ever())
        try:
            await subscribed(client, 0)
        finally:
            pinging.cancel()
            await asyncio.wait({pinging})
    finally:
        connection.abort()


# --- the close handshake ----------------------------------------------------------------------


async def test_the_clients_close_is_answered_then_the_server_closes_the_socket(
    client: AppClient, open_raw_ws: RawWSOpener
) -> None:
    ws = await raw_ws(open_raw_ws, client, new_session_id())
    await subscribed(client, 1)
    ws.protocol.send_close(CloseCode.GOING_AWAY, "tab closed")
    ws.send_queued()
    answer = close_of(await ws.next_of(Opcode.CLOSE))
    assert (answer.code, answer.reason) == (CloseCode.GOING_AWAY, "tab closed")
    await ws.closed_by_server()
    await subscribed(client, 0)


async def test_a_client_that_does_not_answer_the_close_is_dropped(
    client: AppClient, open_raw_ws: RawWSOpener
) -> None:
    """After the final event the server sends 1000 and waits for the client's answer a
    moment only (CLOSE_TIMEOUT, 2 s): a client that never answers does not keep the
    socket or the subscription."""
    session_id = new_session_id()
    ws = await raw_ws(open_raw_ws, client, session_id)
    await publish(client, session_id, final())
    assert (await ws.next_stored_event())["seq"] == 1
    assert close_of(await ws.next_of(Opcode.CLOSE)).code == CloseCode.NORMAL_CLOSURE
    ws.forget_queued()  # the answer websockets queued is never sent
    await ws.closed_by_server()
    await subscribed(client, 0)


def handshake_of(path: str) -> bytes:
    """A client's WebSocket handshake request for ``path``."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.asynccontextmanager
async def upgraded_with(client: AppClient, early: Protocol) -> AsyncIterator[RawWebSocket]:
    """A WebSocket whose client sent ``early``'s frames with its handshake, in one
    packet, without waiting for the 101; dropped on the way out."""
    connection = await RawConnection.open(client.server)
    try:
        connection.writer.write(
            handshake_of(ws_path(new_session_id())) + b"".join(early.data_to_send())
        )
        async with asyncio.timeout(EVENT_TIMEOUT):
            head = await connection.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        yield RawWebSocket(connection)
    finally:
        connection.abort()


async def test_frames_sent_with_the_handshake_are_read_as_if_sent_after_it(
    make_client: ClientFactory, settings: Settings
) -> None:
    """A client that does not wait for the 101 (RFC 6455 4.1 asks it to) sends its first
    frames in the same packet as its handshake: they are read like any later frame (a
    ping gets its pong, a ``ping`` command its heartbeat), not dropped unread."""
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    early = Protocol(Side.CLIENT, max_size=None)
    early.send_ping(b"early")
    early.send_text(b'{"type": "ping"}')
    async with upgraded_with(client, early) as ws:
        assert (await ws.next_of(Opcode.PONG)).data == b"early"
        assert (await ws.next_event())["type"] == "heartbeat"


async def test_more_sent_with_the_handshake_than_one_largest_message_is_refused(
    make_client: ClientFactory, settings: Settings
) -> None:
    """What a client sends before the 101 is read in one go: more than one message of
    ``max_frame_size`` (and its header) is refused with 1008 rather than parsed at once,
    which would hold every other stream up while it is."""
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    early = Protocol(Side.CLIENT, max_size=None)
    for _ in range(2):
        early.send_text(b'{"type": "ping"}'.ljust(settings.max_frame_size // 2 + 1))
    async with upgraded_with(client, early) as ws:
        assert close_of(await ws.next_of(Opcode.CLOSE)).code == CloseCode.POLICY_VIOLATION
