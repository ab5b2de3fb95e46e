"""An SSE stream once its headers are out: the socket's own protocol, without aiohttp.

The SSE handler (``sse.py``) admits the client, subscribes and sends the
headers; then :meth:`SseStream.begin` takes the socket from aiohttp
(``takeover.py``) and the handler returns. From there this object owns the
stream: its subscription, its admission ticket and its socket. Like a
WebSocket's, its task runs only while something is queued (the replay, a
backlog, the final event); an idle stream is this object, its subscription and
the socket, and the hub writes live events and heartbeats to it directly.

The stream ends with the final event, when the server cuts it off (a slow
consumer, shutdown), or when the client goes: the last chunk is written, the
socket closed, and ``connection_lost`` gives back the subscription and the ticket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from aiohttp import web

from ..hub import Frame, Hub, Subscription, SubscriptionClosed
from ..limits import Ticket
from ..messages import SLOW_CONSUMER
from ..metrics import Metrics
from .pump import Outlet, pump, slow_consumer_notice
from .takeover import take_over

log = logging.getLogger(__name__)

# The end of a chunk-encoded body.
_LAST_CHUNK = b"0\r\n\r\n"
# At shutdown, how long a client gets to take a stream's last bytes before it is dropped.
_LAST_BYTES_TIMEOUT = 2.0


def _sse_chunk(frame: Frame) -> bytes:
    return frame.sse_chunk


def _sse_frame(frame: Frame) -> bytes:
    return frame.sse_frame


class SseStreams:
    """Every stream taken from aiohttp: aiohttp no longer knows them, so shutdown waits
    for them here."""

    def __init__(self) -> None:
        self._open: set[SseStream] = set()
        self._all_ended: asyncio.Future[None] | None = None

    def __iter__(self) -> Iterator[SseStream]:
        return iter(list(self._open))

    def add(self, stream: SseStream) -> None:
        self._open.add(stream)

    def discard(self, stream: SseStream) -> None:
        self._open.discard(stream)
        if not self._open and self._all_ended is not None and not self._all_ended.done():
            self._all_ended.set_result(None)

    async def ended(self, timeout: float = _LAST_BYTES_TIMEOUT) -> None:
        """Wait until every stream has ended (call it once the hub has closed their
        subscriptions); a stream whose client has not taken its last bytes within
        ``timeout`` is aborted."""
        if not self._open:
            return
        self._all_ended = all_ended = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(all_ended)
        except TimeoutError:
            for stream in self:
                stream.abort()
            try:
                async with asyncio.timeout(timeout):
                    await all_ended
            except TimeoutError:
                log.warning("%d SSE streams had not ended at shutdown", len(self._open))


class SseStream(asyncio.Protocol):
    """One SSE stream's socket protocol and the owner of its subscription and ticket."""

    # Slots: an idle stream holds one of these for hours.
    __slots__ = (
        "_chunked",
        "_drained",
        "_encode",
        "_hub",
        "_outlet",
        "_paused",
        "_released",
        "_sender",
        "_streams",
        "_subscription",
        "_ticket",
        "_transport",
    )

    def __init__(
        self, hub: Hub, streams: SseStreams, subscription: Subscription, ticket: Ticket
    ) -> None:
        self._hub = hub
        self._streams = streams
        self._subscription = subscription
        self._ticket = ticket
        self._transport: asyncio.Transport | None = None
        self._outlet: Outlet | None = None
        self._chunked = False
        self._encode = _sse_chunk
        self._paused = False  # the socket's buffer is over its high-water mark
        self._drained: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._released: asyncio.Task[None] | None = None

    def begin(
        self, request: web.BaseRequest, metrics: Metrics, interval: float, *, chunked: bool
    ) -> None:
        """Take the socket from aiohttp and send what is queued (the replay); the hub
        writes what follows. ``chunked``: the response is chunk-encoded (HTTP/1.1), so
        the cached chunk goes on the wire as is; an HTTP/1.0 one (nginx's default to its
        upstreams) takes the bare frame. Raises ``ConnectionResetError`` if the client
        is gone; until this returns, the caller still owns the subscription and ticket."""
        transport = take_over(request, self)
        self._transport = transport
        self._chunked = chunked
        self._encode = _sse_chunk if chunked else _sse_frame
        self._paused = transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
        self._outlet = Outlet(
            self._subscription,
            transport,
            metrics,
            "sse",
            interval,
            prebuilt=self._encode,
            send=self._send,
            on_wake=self._wake,
        )
        self._streams.add(self)
        self._wake()

    @property
    def session_id(self) -> str:
        return self._subscription.session_id

    @property
    def backlog(self) -> int:
        """Bytes written to the socket that its client has not taken yet (beyond what the
        kernel holds)."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- sending --------------------------------------------------------------------------

    def _wake(self) -> None:
        # A task that has parked is done at once (it returns in the step that parked it).
        if self._released is None and (self._sender is None or self._sender.done()):
            self._sender = asyncio.create_task(self._send_queued())

    async def _send_queued(self) -> None:
        """Send until parked (the hub writes what comes), or until the stream ends."""
        assert self._outlet is not None
        try:
            if await pump(self._outlet, park=True) is None:
                return
        except SubscriptionClosed as closed:
            if closed.reason == SLOW_CONSUMER:
                self._write(slow_consumer_notice(self._subscription.session_id))
        except ConnectionError:
            pass  # the client went away: connection_lost follows
        finally:
            # A finished task keeps its coroutine (about 900 bytes) while referenced.
            if self._sender is asyncio.current_task():
                self._sender = None
        self._end()

    async def _send(self, frame: Frame) -> None:
        self._write(frame)
        if self._paused:
            self._drained = drained = asyncio.get_running_loop().create_future()
            await drained

    def _write(self, frame: Frame) -> None:
        assert self._transport is not None
        if not self._transport.is_closing():
            self._transport.write(self._encode(frame))

    def _end(self) -> None:
        """The final event is out, or the server ended the stream: no more direct writes,
        the last chunk, then close (``connection_lost`` releases the rest)."""
        self._subscription.detach()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._chunked:
                transport.write(_LAST_CHUNK)
            transport.close()
            if transport.get_write_buffer_size() and self._outlet is not None:
                # A closing socket stays open until its client takes what is left: one
                # that has stopped reading gets a heartbeat interval, as a stuck send does.
                asyncio.get_running_loop().call_later(self._outlet.interval, transport.abort)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """An SSE client sends nothing after its request; whatever comes is dropped."""

    def eof_received(self) -> None:
        """The client closed its side: the socket closes (``connection_lost`` follows)."""

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._subscription.detach()
        self._ticket.release()  # the connection limits count it out now
        self._released = asyncio.get_running_loop().create_task(self._leave(self._sender))

    async def _leave(self, sender: asyncio.Task[None] | None) -> None:
        try:
            if sender is not None and not sender.done():
                sender.cancel()
                await asyncio.wait({sender})
            await self._hub.leave(self._subscription)
        except Exception:
            log.exception("an SSE stream of %s failed to leave", self._subscription.session_id)
        finally:
            self._streams.discard(self)
