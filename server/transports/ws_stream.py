"""A WebSocket once its 101 is out (see ``stream.py``).

Frames out are whole text frames: an event's is built once and shared by every
subscriber. Frames in are read by the sans-I/O protocol of the ``websockets``
library (RFC 6455: masking, fragments, control frames, the close handshake, the
size limit), which answers pings and closes itself; this module only says what a
client's message means: ``{"type": "ping"}`` gets a ``heartbeat`` event, anything
else an ``invalid_message`` error (PROTOCOL.md).

Close codes follow PROTOCOL.md: 1000 after the final event, 1001 on shutdown,
1013 too slow to keep up; 1009 for a message over ``max_frame_size``, 1007 for
text that is not UTF-8 and 1002 for a broken frame. A dead peer is found with
protocol pings: one every heartbeat interval (``Streams``' round), and a peer
that has sent nothing since the last one, not even its pong, is dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode, Opcode
from websockets.frames import Frame as WireFrame
from websockets.protocol import Protocol, Side, State

from ..hub import Frame, Hub, Subscription
from ..limits import Ticket
from ..messages import INVALID_MESSAGE, SLOW_CONSUMER, ControlEvent
from ..metrics import Metrics
from .pump import slow_consumer_notice
from .stream import EndReason, Stream, Streams

# How long a client gets to answer the server's close frame before its socket is dropped.
CLOSE_TIMEOUT = 2.0

_CLOSES: dict[EndReason, tuple[int, str]] = {
    "finished": (CloseCode.NORMAL_CLOSURE, "workflow finished"),
    "slow_consumer": (CloseCode.TRY_AGAIN_LATER, "too slow to keep up; resume later"),
    "shutdown": (CloseCode.GOING_AWAY, "server going away; reconnect and resume"),
}
_PING = WireFrame(Opcode.PING, b"").serialize(mask=False)
_MESSAGE_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)

# websockets' protocol logs every connection it closes at INFO; the server's own logs and
# metrics already say what a stream did. Its warnings and errors still come through.
_FRAMES_LOG = logging.getLogger(__name__ + ".frames")
_FRAMES_LOG.setLevel(logging.WARNING)


# A client frame's header at its longest: 2 bytes, an 8-byte length, a 4-byte mask.
_LARGEST_HEADER = 14


def _ws_frame(frame: Frame) -> bytes:
    return frame.ws_frame


def _is_ping(text: str) -> bool:
    try:
        command = json.loads(text)
    except (ValueError, RecursionError):  # nesting deeper than the parser's recursion limit
        return False
    return isinstance(command, dict) and command.get("type") == "ping"


class WsStream(Stream):
    __slots__ = ("_heard", "_metrics", "_pieces", "_reader")

    transport_name = "websocket"

    def __init__(
        self,
        hub: Hub,
        streams: Streams,
        subscription: Subscription,
        ticket: Ticket,
        *,
        metrics: Metrics,
        max_frame_size: int,
    ) -> None:
        """``max_frame_size``: the largest message a client may send; above it, 1009."""
        super().__init__(hub, streams, subscription, ticket)
        self._metrics = metrics
        self._reader = Protocol(Side.SERVER, max_size=max_frame_size, logger=_FRAMES_LOG)
        # A message coming in pieces, so far: its kind and its bytes (bounded by
        # max_frame_size, as websockets counts the pieces' total; however many pieces).
        self._pieces: tuple[Opcode, bytearray] | None = None
        self._heard = True  # the peer has sent something since the last ping

    def _prebuilt(self) -> Callable[[Frame], bytes]:
        return _ws_frame

    def _writable(self) -> bool:
        # No frame may follow a close frame, whoever sent it first.
        return super()._writable() and self._reader.state is State.OPEN

    def _end(self, reason: EndReason) -> None:
        if reason == "gone":
            self.abort()
            return
        if reason == SLOW_CONSUMER:
            self._write(slow_consumer_notice(self.session_id))
        code, why = _CLOSES[reason]
        self._reader.send_close(code, why)
        self._flush()
        self._abort_later(CLOSE_TIMEOUT)  # unless the client answers the close before

    def keep_alive(self) -> None:
        if not self._writable():
            return
        if not self._heard:
            self.abort()  # nothing for a whole interval, not even a pong: the peer is gone
            return
        self._heard = False
        assert self._transport is not None
        self._transport.write(_PING)

    # --- what the client sends --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        was_open = reader.state is State.OPEN
        reader.receive_data(data)
        self._heard = True
        for event in reader.events_received():
            # Frames only: a protocol made OPEN has no handshake to report.
            if isinstance(event, WireFrame) and event.opcode in _MESSAGE_OPCODES:
                if reader.state is State.OPEN:
                    self._take(event)
        if was_open and reader.state is not State.OPEN:
            # The client's close, or a frame that fails the connection: the close frame
            # websockets answers with must be the last, so the hub stops writing first.
            self._subscription.detach()
            if isinstance(reader.parser_exc, PayloadTooBig):
                self._metrics.refused("frame_too_large")
        self._flush()

    def early_frames(self, data: bytes) -> None:
        """Frames the client sent before the 101 (:func:`.takeover.early_bytes`), read like
        any later ones, up to one largest message and its header. More is refused (1008)
        rather than parsed in one go, which would hold the event loop up: aiohttp before
        3.14 keeps all a client sends before the 101, however much."""
        if len(data) <= (self._reader.max_message_size or 0) + _LARGEST_HEADER:
            self.data_received(data)
            return
        self._subscription.detach()  # the close frame must be the last
        self._reader.fail(CloseCode.POLICY_VIOLATION, "frames sent before the handshake")
        self._flush()

    def _take(self, frame: WireFrame) -> None:
        """A data frame: a whole message, or a piece of one (websockets checks the
        pieces' order and their total size)."""
        if frame.opcode is not Opcode.CONT:
            if not frame.fin:
                self._pieces = (frame.opcode, bytearray(frame.data))
                return
            self._answer(frame.opcode, bytes(frame.data))
            return
        assert self._pieces is not None  # websockets refuses a continuation of nothing
        opcode, message = self._pieces
        message += frame.data
        if frame.fin:
            self._pieces = None
            self._answer(opcode, bytes(message))

    def _answer(self, opcode: Opcode, data: bytes) -> None:
        session_id = self.session_id
        if opcode is Opcode.TEXT:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self._reader.fail(CloseCode.INVALID_DATA, "text is not UTF-8")
                return
            if _is_ping(text):
                self._subscription.push_control(ControlEvent.heartbeat(session_id))
                return
        self._subscription.push_control(
            ControlEvent.error(
                session_id,
                INVALID_MESSAGE,
                'Unknown message. The only command is {"type": "ping"}.',
            )
        )

    def _flush(self) -> None:
        """Write what websockets has to send (a pong, a close frame); its end of stream
        means the server closes the socket (once the close handshake is done, or at once
        when the connection failed)."""
        transport = self._transport
        assert transport is not None
        for data in self._reader.data_to_send():
            if transport.is_closing():
                return
            if data:
                transport.write(data)
            else:
                self._close(within=CLOSE_TIMEOUT)
