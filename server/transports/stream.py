"""A stream once its handshake is out: the socket's own protocol, without aiohttp.

The WebSocket and SSE handlers admit the client, subscribe and send the
handshake (the 101, or the SSE headers); then :meth:`Stream.begin` takes the
socket from aiohttp (``takeover.py``) and the handler returns. From there a
:class:`Stream` owns the connection: its subscription, its admission ticket
and its socket. Its task runs only while something is queued (the replay, a
backlog, a frame for this connection only, the final event); an idle stream
is this object, its subscription and the socket, and the hub writes live
events and heartbeats to it directly.

A stream ends with the final event, when the server cuts it off (a slow
consumer, shutdown), or when the client goes; each transport ends it its own
way (``ws_stream.py``, ``sse_stream.py``), and ``connection_lost`` gives back
the subscription and the ticket.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Literal

from aiohttp import web

from ..hub import Frame, Hub, Subscription, SubscriptionClosed
from ..limits import Ticket
from ..metrics import Metrics
from .pump import Outlet, pump
from .takeover import take_over

log = logging.getLogger(__name__)

# Why a stream ends: the final event is out, the server cut it off, or the client went.
EndReason = Literal["finished", "slow_consumer", "shutdown", "gone"]

# At shutdown, how long a client gets to take a stream's last bytes before it is dropped.
_LAST_BYTES_TIMEOUT = 2.0
# Streams a keep-alive round visits before it lets the event loop run other work.
_PER_TURN = 128


class Streams:
    """Every stream taken from aiohttp. aiohttp no longer knows them, so shutdown waits
    for them here, and one round every heartbeat interval checks their peers are alive
    (one timer for all, not one per connection)."""

    def __init__(self) -> None:
        self._open: set[Stream] = set()
        self._all_ended: asyncio.Future[None] | None = None
        self._keeping_alive: asyncio.Task[None] | None = None

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._open))

    def add(self, stream: Stream) -> None:
        self._open.add(stream)

    def discard(self, stream: Stream) -> None:
        self._open.discard(stream)
        if not self._open and self._all_ended is not None and not self._all_ended.done():
            self._all_ended.set_result(None)

    def start(self, interval: float) -> None:
        """Start the keep-alive rounds, one every ``interval`` seconds."""
        self._keeping_alive = asyncio.create_task(self._keep_alive(interval))

    async def close(self) -> None:
        task, self._keeping_alive = self._keeping_alive, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def _keep_alive(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for visited, stream in enumerate(self, start=1):
                stream.keep_alive()
                if visited % _PER_TURN == 0:
                    await asyncio.sleep(0)  # let live events and requests through

    async def ended(self, timeout: float = _LAST_BYTES_TIMEOUT) -> None:
        """Wait until every stream has ended (call it once the hub has closed their
        subscriptions); a stream whose client has not taken its last bytes (or, over a
        WebSocket, answered the close) within ``timeout`` is aborted."""
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
                log.warning("%d streams had not ended at shutdown", len(self._open))


class Stream(asyncio.Protocol, abc.ABC):
    """One stream's socket protocol and the owner of its subscription and ticket. A
    transport subclasses it with how a frame is encoded, how the stream ends, and what
    the client may send."""

    # Slots: an idle stream holds one of these for hours.
    __slots__ = (
        "_drained",
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

    transport_name: str  # in metrics and logs

    def __init__(
        self, hub: Hub, streams: Streams, subscription: Subscription, ticket: Ticket
    ) -> None:
        self._hub = hub
        self._streams = streams
        self._subscription = subscription
        self._ticket = ticket
        self._transport: asyncio.Transport | None = None
        self._outlet: Outlet | None = None
        self._paused = False  # the socket's buffer is over its high-water mark
        self._drained: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._released: asyncio.Task[None] | None = None

    def begin(self, request: web.BaseRequest, metrics: Metrics, interval: float) -> None:
        """Take the socket from aiohttp and send what is queued (the replay); the hub
        writes what follows. Raises ``ConnectionResetError`` if the client is gone;
        until this returns, the caller still owns the subscription and the ticket."""
        transport = take_over(request, self)
        self._transport = transport
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            self.pause_writing()
        self._outlet = Outlet(
            self._subscription,
            transport,
            metrics,
            self.transport_name,
            interval,
            prebuilt=self._prebuilt(),
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

    @property
    def reading(self) -> bool:
        """The stream reads what its client sends: it does not while the client leaves
        what it is sent unread (see :meth:`pause_writing`)."""
        return self._transport is not None and self._transport.is_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def keep_alive(self) -> None:
        """Called once per heartbeat interval: a transport that can tell a dead peer
        drops it here."""

    # --- what a transport says ------------------------------------------------------------

    @abc.abstractmethod
    def _prebuilt(self) -> Callable[[Frame], bytes]:
        """A frame's bytes on this stream's wire, as the hub writes them directly."""

    @abc.abstractmethod
    def _end(self, reason: EndReason) -> None:
        """Write how the stream ends (its last frames), then close or start closing the
        socket; ``connection_lost`` releases the rest. Called once the subscription is
        detached, with the socket still open."""

    def _writable(self) -> bool:
        """The stream may still write a frame."""
        return self._transport is not None and not self._transport.is_closing()

    # --- sending --------------------------------------------------------------------------

    def _wake(self) -> None:
        # A task that has parked is done at once (it returns in the step that parked it).
        if self._released is None and (self._sender is None or self._sender.done()):
            self._sender = asyncio.create_task(self._send_queued())

    async def _send_queued(self) -> None:
        """Send until parked (the hub writes what comes), or until the stream ends."""
        assert self._outlet is not None
        reason: EndReason
        try:
            finished = await pump(self._outlet, park=True)
            if finished is None:
                return
            reason = "finished" if finished else "gone"
        except SubscriptionClosed as closed:
            reason = closed.reason
        except ConnectionError:
            reason = "gone"  # connection_lost follows
        finally:
            # A finished task keeps its coroutine (about 900 bytes) while referenced.
            if self._sender is asyncio.current_task():
                self._sender = None
        self._finish(reason)

    def _finish(self, reason: EndReason) -> None:
        """No more direct writes; then the transport's end, if the socket is still open."""
        self._subscription.detach()
        if self._writable():
            self._end(reason)

    async def _send(self, frame: Frame) -> None:
        self._write(frame)
        if self._paused:
            assert self._outlet is not None
            self._drained = drained = asyncio.get_running_loop().create_future()
            # Bounded whatever the buffer held before: one large frame can fill it alone,
            # and a client that has stopped reading would hold this stream for good.
            async with asyncio.timeout(self._outlet.interval):
                await drained

    def _write(self, frame: Frame) -> None:
        if self._writable():
            assert self._transport is not None
            self._transport.write(self._prebuilt()(frame))

    def _abort_later(self, delay: float) -> None:
        """A closing socket stays open until its client takes what is left, or answers:
        one that does not within ``delay`` seconds is dropped."""
        if self._transport is not None:
            asyncio.get_running_loop().call_later(delay, self._transport.abort)

    def _close(self, within: float) -> None:
        """Close the socket once its client has taken what is left; a client that has
        stopped reading is dropped ``within`` seconds later."""
        assert self._transport is not None
        self._transport.close()
        if self._transport.get_write_buffer_size():
            self._abort_later(within)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def eof_received(self) -> None:
        """The client closed its side: the socket closes (``connection_lost`` follows)
        once it has sent what is left in its buffer, and is dropped a heartbeat interval
        later if the client does not take it. (asyncio's own close, which follows, would
        wait for that for as long as the client keeps its socket open.)"""
        if self._transport is not None and self._outlet is not None:
            self._close(within=self._outlet.interval)

    def pause_writing(self) -> None:
        self._paused = True
        # A client that does not read is not read either: what it sends may call for
        # answers (a WebSocket's pongs) that would otherwise pile up here without bound.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resume_reading()
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
            log.exception(
                "a %s stream of %s failed to leave",
                self.transport_name,
                self._subscription.session_id,
            )
        finally:
            self._streams.discard(self)
