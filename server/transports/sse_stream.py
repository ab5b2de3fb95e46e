"""An SSE stream once its headers are out (see ``stream.py``).

Each frame is the event's cached ``id:/event:/data:`` text, as an HTTP chunk when
the response is chunk-encoded (HTTP/1.1) and bare on an HTTP/1.0 response (nginx's
default to its upstreams). The stream ends with the last chunk and the socket's
close; a client that was cut off as too slow gets an ``error`` event first.
"""

from __future__ import annotations

from collections.abc import Callable

from ..hub import Frame, Hub, Subscription
from ..limits import Ticket
from ..messages import SLOW_CONSUMER
from .pump import slow_consumer_notice
from .stream import EndReason, Stream, Streams

# The end of a chunk-encoded body.
_LAST_CHUNK = b"0\r\n\r\n"


def _sse_chunk(frame: Frame) -> bytes:
    return frame.sse_chunk


def _sse_frame(frame: Frame) -> bytes:
    return frame.sse_frame


class SseStream(Stream):
    __slots__ = ("_chunked",)

    transport_name = "sse"

    def __init__(
        self,
        hub: Hub,
        streams: Streams,
        subscription: Subscription,
        ticket: Ticket,
        *,
        chunked: bool,
    ) -> None:
        """``chunked``: the response is chunk-encoded, so frames go out as chunks."""
        super().__init__(hub, streams, subscription, ticket)
        self._chunked = chunked

    def _prebuilt(self) -> Callable[[Frame], bytes]:
        return _sse_chunk if self._chunked else _sse_frame

    def _end(self, reason: EndReason) -> None:
        assert self._transport is not None
        if reason == SLOW_CONSUMER:
            self._write(slow_consumer_notice(self.session_id))
        if self._chunked:
            self._transport.write(_LAST_CHUNK)
        assert self._outlet is not None
        # A client that has stopped reading gets a heartbeat interval to take the rest,
        # as a stuck send does.
        self._close(within=self._outlet.interval)

    def data_received(self, data: bytes) -> None:
        """An SSE client sends nothing after its request; whatever comes is dropped."""
