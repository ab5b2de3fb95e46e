"""The session hub: subscriptions, replay and fan-out. It knows no HTTP.

Data flows one way::

    publish(event) -> broker.append -> broker calls Hub._fan_out(stored)
                   -> for each local subscriber of that session, either
         a steady one (caught up, socket idle): the frame is written to its socket here
         any other: Subscription.deliver queues it, the transport's task sends it

Single-process and multi-process delivery take the same path: the in-memory
broker calls ``_fan_out`` inside ``append``; the Redis broker calls it from
its one reader per process.

A subscription registers for live events *before* it reads its replay, and
holds live events back until the replay is queued, then drops what the
replay already covered (by ``seq``), and late messages of an epoch the stream
had left when read (``Replay.still_news``). So nothing published in between is
lost or sent twice.

The steady path is what makes a fan-out to a thousand sockets cheap: one loop,
one pre-built frame per transport, one write per socket, no task switch. A
subscriber joins it when its transport's task finds nothing left to send, and
leaves it (back to its own queue) as soon as its socket backs up, it gets a
frame of its own (a heartbeat answer, a notice), it is closed, or the stream
does not continue where the steady ones stand (a gap, a new epoch, the final
event, which the transport's task sends before closing). Heartbeats take the
same two ways, from one timer for the whole hub rather than one per connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

from .brokers.base import Broker, IdempotencyKey, Replay
from .errors import ServiceUnavailable
from .messages import (
    REPLAY_GAP,
    CompleteEvent,
    ControlEvent,
    ErrorEvent,
    StorableEvent,
    StoredEvent,
    StreamPosition,
)
from .metrics import LATENCY_SAMPLE_EVERY, HotCounterChild, Metrics

if TYPE_CHECKING:
    from prometheus_client import Histogram

log = logging.getLogger(__name__)

Frame = StoredEvent | ControlEvent
CloseReason = Literal["slow_consumer", "shutdown"]

# How long a subscriber's re-read of its session waits before it tries again, once the
# broker has given up on an unavailable event store.
_RESYNC_PAUSE = 0.5

# Live events a subscriber may hold back while its replay is read, in queue sizes (or a
# session's whole buffer and a queue, if more: a Redis catch-up may deliver that at
# once): the replay covers most of them (they are dropped then), and a read takes a few
# seconds at the most (the broker's retries).
_HELD_WHILE_READING = 4

# Subscribers a heartbeat round writes before it lets the event loop run other work.
_HEARTBEATS_PER_TURN = 128


class Sink:
    """What the hub needs to write a steady subscriber's live events and heartbeats
    itself: its socket (the asyncio transport, and the file descriptor under it), the
    transport's pre-built bytes of a frame (an event's are shared by all its
    subscribers), and the transport's delivery counter and latency histogram."""

    __slots__ = ("delivered", "encode", "fd", "latency", "socket")

    def __init__(
        self,
        socket: asyncio.Transport,
        encode: Callable[[Frame], bytes],
        delivered: HotCounterChild,
        latency: Histogram,
    ) -> None:
        self.socket = socket
        # Plain TCP only (the server speaks no TLS itself: a proxy terminates it), so the
        # bytes written to the descriptor are the bytes on the wire.
        self.fd: int = socket.get_extra_info("socket").fileno()
        self.encode = encode
        self.delivered = delivered
        self.latency = latency

    def writable_now(self) -> bool:
        """The socket takes a write at once: open, nothing waiting in its buffer."""
        return not self.socket.get_write_buffer_size() and not self.socket.is_closing()


class _Local:
    """This process's subscribers of one session, and where the steady ones stand."""

    __slots__ = ("epoch", "members", "seq")

    def __init__(self) -> None:
        # Every subscriber; the value is its Sink while it is steady, else None.
        self.members: dict[Subscription, Sink | None] = {}
        # The last event fanned out here: every steady subscriber has had it.
        self.epoch: str | None = None
        self.seq = 0


class SubscriptionClosed(Exception):
    """The server ended this subscription: the client should reconnect and resume."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    """One subscriber's view of one session: replay first, then live events, in ``seq`` order.

    A transport that can write without waiting attaches a :class:`Sink`:
    while the subscriber is steady, the hub writes its live events straight to
    the socket. Otherwise live events wait in a bounded queue for the
    transport's task. A subscriber that falls ``queue_size`` events behind is
    closed (reason ``slow_consumer``) instead of slowing the publisher or the
    other subscribers; it resumes from the buffer when it reconnects.
    """

    # Slots: an idle connection holds one of these for hours; a __dict__ would double it.
    __slots__ = (
        "_closed",
        "_control",
        "_epoch",
        "_final_seen",
        "_hub",
        "_last_seq",
        "_local",
        "_on_wake",
        "_pending",
        "_queue",
        "_queue_size",
        "_replay_left",
        "_sink",
        "_store_away",
        "_waiter",
        "session_id",
    )

    def __init__(self, hub: Hub, local: _Local, session_id: str, queue_size: int) -> None:
        self.session_id = session_id
        self._hub = hub
        self._local = local
        self._queue_size = queue_size
        # Queues are created on first use: an idle subscriber whose events all go
        # straight to its socket never holds one (a deque costs ~600 bytes).
        self._control: deque[ControlEvent] | None = None  # sent first: notices, heartbeats
        self._queue: deque[Frame] | None = None  # the replay (a gap notice first), then live
        self._replay_left = 0  # the head of _queue that is replay, not live backlog
        self._pending: list[StoredEvent] | None = []  # live events held back during replay
        self._store_away = False  # a re-read waits for the event store: _pending is capped
        self._epoch: str | None = None
        self._last_seq = 0
        self._final_seen = False
        self._closed: CloseReason | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        # Called when there is something to send and no task waits in get(): a transport
        # whose task stops while the hub writes for it (park) starts one again here.
        self._on_wake: Callable[[], None] | None = None

    # --- producer side (the hub) --------------------------------------------------------

    def _start(self, replay: Replay, gap: bool, held_before_read: int = 0) -> None:
        """Queue the replay (after a ``replay_gap`` notice if needed), then release the
        held events still news (see :meth:`Replay.still_news`)."""
        if gap:
            # In the event queue, not with the control frames that go first: the client
            # forgets what it derived when the notice comes, so events still queued from
            # before the gap (a re-read under a live subscriber) must reach it first.
            self._enqueue(
                ControlEvent.error(
                    self.session_id,
                    REPLAY_GAP,
                    "Some earlier events are no longer available; replaying what is retained.",
                )
            )
        if replay.info is not None:
            # Where this subscriber stands now: just before the first replayed event, or,
            # with nothing to replay (resumed at the newest event), at the newest event.
            # Live events are then taken from the next seq on, none repeated or skipped.
            self._epoch = replay.info.epoch
            self._last_seq = replay.events[0].seq - 1 if replay.events else replay.info.last_seq
        for event in replay.events:
            self._accept(event)
        self._replay_left = len(self._queue or ())
        ended = replay.info is not None and replay.info.ended
        if ended and not replay.events and not gap and not self._queue:
            # Resumed exactly at the final event: there is nothing left to send. (A
            # re-read while the final event waits in the queue, unsent, finds the same,
            # but then it is sent first.)
            self._final_seen = True
        held, self._pending = self._pending, None
        for event in replay.still_news(held or [], held_before_read):
            self.deliver(event)
        self._wake()

    def _accept(self, event: StoredEvent) -> None:
        self._epoch = event.epoch
        self._last_seq = event.seq
        self._enqueue(event)

    def _enqueue(self, frame: Frame) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(frame)

    def deliver(self, event: StoredEvent) -> None:
        """Take one live event. Never blocks, never awaits."""
        if self._closed is not None:
            return
        if self._pending is not None:
            # Held while a replay or re-read is read. One that waits for an unavailable
            # store, for as long as it is away, holds at most queue_size of them, as any
            # subscriber that far behind; one under way ends soon and then drops what it
            # covers, so it may hold more, within a bound all the same.
            held = self._queue_size if self._store_away else self._hub._held_while_reading
            if len(self._pending) >= held:
                self.close("slow_consumer")
                return
            self._pending.append(event)
            return
        same_stream = self._epoch is None or event.epoch == self._epoch
        if same_stream and event.seq <= self._last_seq:
            return  # already replayed
        if not same_stream or event.seq != self._last_seq + 1:
            # Missed something (a lossy live path, or the stream was recreated):
            # re-read from where we are; the broker signals a gap if it must.
            self._pending = [event]
            self._hub._resync(self)
            return
        if self._queue and len(self._queue) - self._replay_left >= self._queue_size:
            self.close("slow_consumer")
            return
        self._accept(event)
        self._wake()

    def push_control(self, event: ControlEvent) -> None:
        """Queue an event for this connection only (a heartbeat answer, an error notice).
        A client that asks for more answers than it reads (pings, say, sent faster than
        it takes the heartbeats back) is closed as a slow consumer once ``queue_size``
        of them wait: what it sends never grows the server's memory without bound."""
        if self._closed is not None or self._final_seen:
            return  # nothing follows the final event, even while it is being written
        self._leave_steady()  # the transport's task sends it, in order with what follows
        if self._control is None:
            self._control = deque()
        elif len(self._control) >= self._queue_size:
            self.close("slow_consumer")
            return
        self._control.append(event)
        self._wake()

    @property
    def joined(self) -> bool:
        """Still one of its session's subscribers (its stream has not left the hub)."""
        return self in self._local.members

    def close(self, reason: CloseReason) -> None:
        if self._closed is None:
            self._leave_steady()
            self._closed = reason
            self._hub._metrics.subscriber_closed(reason)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        elif self._on_wake is not None:
            self._on_wake()

    # --- the steady path ------------------------------------------------------------------

    def attach(self, sink: Sink, on_wake: Callable[[], None] | None = None) -> None:
        """Let the hub write live events and heartbeats straight to this socket whenever
        it can. ``on_wake``: see :meth:`park`."""
        self._sink = sink
        self._on_wake = on_wake

    def detach(self) -> None:
        """No more direct writes: before the connection's last frame, or its close frame."""
        self._leave_steady()
        self._sink = None
        self._on_wake = None

    def park(self) -> bool:
        """Called by the transport's task when it has nothing left to send. ``True`` when
        the task may end now: the subscriber is steady, so the hub writes what comes,
        and calls ``on_wake`` for anything it cannot write itself. An idle connection
        then holds no task at all."""
        self._join_steady()
        return self._on_wake is not None and self.steady

    def _join_steady(self) -> None:
        """Called by the transport's task when it has nothing left to send."""
        sink = self._sink
        local = self._local
        if (
            sink is None
            or self._closed is not None
            or self._pending is not None
            or self._final_seen
            or self._control
            or self._queue
            or not sink.writable_now()
            or self not in local.members
        ):
            return
        if local.epoch is None:
            # Nothing fanned out here yet: start where this one stands (on a stream that
            # does not exist yet, before seq 1 of whatever epoch it gets).
            local.epoch, local.seq = self._epoch, self._last_seq
        if (self._epoch, self._last_seq) == (local.epoch, local.seq):
            local.members[self] = sink

    def _leave_steady(self) -> None:
        local = self._local
        if local.members.get(self) is not None:
            local.members[self] = None
            self._epoch, self._last_seq = local.epoch, local.seq

    # --- consumer side (the transport) --------------------------------------------------

    @property
    def finished(self) -> bool:
        """The final event was delivered (or the resume point was the final event)."""
        return self._final_seen and not self._control

    @property
    def steady(self) -> bool:
        """The hub writes this subscriber's live events straight to its socket."""
        return self._local.members.get(self) is not None

    @property
    def position(self) -> StreamPosition | None:
        """The last event this subscriber has been given (sent or queued)."""
        local = self._local
        if self.steady and local.epoch is not None:
            return StreamPosition(local.epoch, local.seq)
        if self._epoch is None or self._last_seq == 0:
            return None
        return StreamPosition(self._epoch, self._last_seq)

    def get_nowait(self) -> Frame | None:
        """The next frame to send, or ``None`` when there is none yet.

        Raises :class:`SubscriptionClosed` once the server has ended the
        subscription (after any control notice queued for it).
        """
        if self._control:
            return self._control.popleft()
        if self._closed is not None:
            raise SubscriptionClosed(self._closed)
        queue = self._queue
        if not queue:
            return None
        event = queue.popleft()
        if self._replay_left:
            self._replay_left -= 1
        if event.final:
            self._final_seen = True
        return event

    async def get(self, timeout: float | None = None) -> Frame | None:
        """Wait for the next frame, at most ``timeout`` seconds if given; ``None`` when
        none came (time-out, or woken with nothing left to send)."""
        frame = self.get_nowait()
        if frame is not None:
            return frame
        try:
            async with asyncio.timeout(timeout):
                await self.wait()
        except TimeoutError:
            return None
        finally:
            self._waiter = None
        return self.get_nowait()

    def wait(self) -> asyncio.Future[None]:
        """A future that is done once there may be a frame to send (then ``get_nowait``).

        Awaiting it directly keeps no coroutine frame of its own, and no timer, for the
        hours an idle stream may wait."""
        self._join_steady()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter


class Subscribing:
    """What :meth:`Hub.subscribe` returns. A class rather than a generator-based context
    manager: a stream stays inside it for hours, and a suspended generator with its
    wrapper would cost about 500 bytes more per connection."""

    __slots__ = ("_hub", "_last_event_id", "_session_id", "_subscription")

    def __init__(self, hub: Hub, session_id: str, last_event_id: str | None) -> None:
        self._hub = hub
        self._session_id = session_id
        self._last_event_id = last_event_id
        self._subscription: Subscription | None = None

    async def __aenter__(self) -> Subscription:
        self._subscription = await self._hub.join(self._session_id, self._last_event_id)
        return self._subscription

    async def __aexit__(self, *exc_info: object) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await self._hub.leave(subscription)


class Hub:
    """Sessions, their local subscribers, and the one publish path."""

    def __init__(
        self,
        broker: Broker,
        *,
        queue_size: int,
        metrics: Metrics,
        heartbeat_interval: float | None = None,
        buffer_size: int = 0,
    ) -> None:
        """``buffer_size``: the events the broker keeps per session, which a Redis live
        connection's catch-up may deliver at once to a subscriber whose replay is read."""
        self.broker = broker
        self._queue_size = queue_size
        # Live events a subscriber may hold back while its replay is read (see deliver).
        self._held_while_reading = max(_HELD_WHILE_READING * queue_size, buffer_size + queue_size)
        self._metrics = metrics
        self._heartbeat_interval = heartbeat_interval
        self._sessions: dict[str, _Local] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.broker.start(self._fan_out)
        if self._heartbeat_interval is not None:
            self._spawn(self._send_heartbeats(self._heartbeat_interval))

    async def close(self) -> None:
        self.close_all("shutdown")
        background = list(self._background)
        for task in background:
            task.cancel()
        if background:
            # asyncio.wait, not ``await task``: a cancellation of close() itself must not
            # be mistaken for the tasks' own and swallowed.
            await asyncio.wait(background)
        await self.broker.close()

    # --- publishing -----------------------------------------------------------------------

    async def publish(self, event: StorableEvent, key: IdempotencyKey | None = None) -> StoredEvent:
        """Validate-once, encode-once, store: the event then reaches every subscriber.

        Raises ``SessionEnded`` after the final event and ``ServiceUnavailable``
        when the broker cannot be reached; with a ``key`` the session has stored,
        ``Repeated`` or ``IdempotencyKeyReused`` (see :meth:`Broker.append`).
        """
        final = isinstance(event, CompleteEvent | ErrorEvent) and event.final
        stored = await self.broker.append(
            event.session_id, event.type, event.model_dump_json(), final, key
        )
        self._metrics.published.labels(type=event.type).inc()
        return stored

    def _fan_out(self, event: StoredEvent) -> None:
        local = self._sessions.get(event.session_id)
        if local is None:
            return
        members = local.members
        # The steady subscribers stand at the last event fanned out; this one must follow it.
        # The final event goes through every subscriber's own task, which then closes.
        follows = (
            event.seq == local.seq + 1
            and (event.epoch == local.epoch or local.epoch is None)
            and not event.final
        )
        # The frame of the encoder last asked: a session's subscribers mostly share one.
        encoder: Callable[[Frame], bytes] | None = None
        frame = b""
        for subscription, sink in members.items():
            if sink is not None:
                socket = sink.socket
                # Sink.writable_now, inlined: this loop runs once per subscriber per event.
                if follows and not socket.get_write_buffer_size() and not socket.is_closing():
                    # The send() that socket.write() would make, without its Python-level
                    # checks, once per subscriber per event. With nothing buffered, the
                    # order is kept; what the kernel does not take, the transport queues,
                    # and an error there closes the socket as the transport's own would.
                    if sink.encode is not encoder:
                        encoder = sink.encode
                        frame = encoder(event)
                    try:
                        written = os.write(sink.fd, frame)
                    except OSError:
                        written = 0
                    if written < len(frame):
                        socket.write(frame[written:])
                    sink.delivered.value += 1
                    continue
                subscription._leave_steady()  # only replaces a value: the loop goes on
            subscription.deliver(event)
        local.epoch = event.epoch
        local.seq = event.seq
        if event.seq % LATENCY_SAMPLE_EVERY == 1:
            # Timed once per transport, after the last direct write: the slowest of them.
            latency = time.monotonic() - event.created
            for histogram in {sink.latency for sink in members.values() if sink is not None}:
                histogram.observe(latency)

    # --- subscribing ----------------------------------------------------------------------

    def subscribe(self, session_id: str, last_event_id: str | None = None) -> Subscribing:
        """``async with hub.subscribe(session_id, last_event_id) as subscription``:
        subscribe to one session, resuming after ``last_event_id`` if given.

        A malformed ``last_event_id`` is a position that cannot be served:
        the subscriber gets ``replay_gap`` and every retained event. The
        subscription is always removed on exit, cancellation included.
        """
        return Subscribing(self, session_id, last_event_id)

    async def read_after(
        self, session_id: str, last_event_id: str | None, limit: int | None = None
    ) -> Replay:
        """The retained events after the event ``last_event_id`` names (all of them
        without one; the oldest ``limit`` when given): a stream's replay, and a page of
        the events over HTTP. A malformed id is a position that cannot be served: a gap,
        with every retained event."""
        position = StreamPosition.parse(last_event_id) if last_event_id else None
        replay = await self.broker.read(session_id, position, limit)
        if last_event_id and position is None and not replay.gap:
            return dataclasses.replace(replay, gap=True)
        return replay

    async def join(self, session_id: str, last_event_id: str | None) -> Subscription:
        """What ``subscribe()`` enters, for a stream that outlives the coroutine that
        subscribed it (a stream once aiohttp has let go of it): whoever joins must
        :meth:`leave`."""
        local = self._sessions.get(session_id)
        if local is None:
            local = self._sessions[session_id] = _Local()
        subscription = Subscription(self, local, session_id, self._queue_size)
        local.members[subscription] = None
        self._metrics.subscribers.inc()
        try:
            if len(local.members) == 1:
                await self.broker.watch(session_id)
            replay = await self.read_after(session_id, last_event_id)
        except BaseException:
            await self.leave(subscription)
            raise
        self._metrics.replays.inc()
        if replay.gap:
            self._metrics.replay_gaps.inc()
        subscription._start(replay, gap=replay.gap)
        return subscription

    async def leave(self, subscription: Subscription) -> None:
        self._metrics.subscribers.dec()
        local, session_id = subscription._local, subscription.session_id
        del local.members[subscription]
        if not local.members and self._sessions.get(session_id) is local:
            del self._sessions[session_id]
            await self.broker.unwatch(session_id)

    def _resync(self, subscription: Subscription) -> None:
        self._spawn(self._resync_one(subscription))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resync_one(self, subscription: Subscription) -> None:
        session_id = subscription.session_id
        warned = False
        while True:
            held_before_read = len(subscription._pending or ())
            try:
                replay = await self.broker.read(session_id, subscription.position)
                subscription._store_away = False
                break
            except ServiceUnavailable:
                subscription._store_away = True
                # The event store is away (the broker has retried for its budget). Open
                # streams stay open through an outage: this one holds its live events
                # (up to its queue size) and reads again until it can, or is gone.
                if not warned:
                    log.warning(
                        "re-reading session %s for a subscriber waits for the event store",
                        session_id,
                    )
                    warned = True
                await asyncio.sleep(_RESYNC_PAUSE)
                if subscription._closed is not None or not subscription.joined:
                    return
            except Exception:
                log.exception("resync of a subscriber of %s failed", session_id)
                subscription.close("slow_consumer")  # it reconnects and resumes from the buffer
                return
        if replay.gap:
            self._metrics.replay_gaps.inc()
        subscription._start(replay, gap=replay.gap, held_before_read=held_before_read)

    # --- heartbeats ---------------------------------------------------------------------

    async def _send_heartbeats(self, interval: float) -> None:
        """One timer for every stream, instead of one per connection: every ``interval``
        seconds each subscriber gets a ``heartbeat`` event (PROTOCOL.md)."""
        while True:
            await asyncio.sleep(interval)
            await self.send_heartbeats()

    async def send_heartbeats(self) -> None:
        """One round, ``_HEARTBEATS_PER_TURN`` subscribers per turn of the event loop: a
        round over 10,000 streams would otherwise hold every live event back for as long
        as 10,000 socket writes take."""
        heartbeat_of = ControlEvent.heartbeats()
        written = 0
        for session_id, local in list(self._sessions.items()):
            if written >= _HEARTBEATS_PER_TURN:
                await asyncio.sleep(0)  # let live events and requests through
                written = 0
            heartbeat = heartbeat_of(session_id)
            for subscription, sink in list(local.members.items()):
                written += 1
                if sink is not None and sink.writable_now():
                    # Steady and idle: written here, like a live event (a heartbeat has
                    # no place in the sequence, so there is no order to keep).
                    sink.socket.write(sink.encode(heartbeat))
                else:
                    subscription.push_control(heartbeat)

    def close_all(self, reason: CloseReason) -> None:
        """End every subscription (server shutdown): clients reconnect and resume elsewhere."""
        for local in self._sessions.values():
            for subscription in list(local.members):
                subscription.close(reason)

    # --- introspection (metrics, tests) ---------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return sum(len(local.members) for local in self._sessions.values())

    @property
    def session_count(self) -> int:
        """Sessions with at least one subscriber in this process."""
        return len(self._sessions)

    @property
    def sessions(self) -> list[str]:
        """The sessions with at least one subscriber in this process."""
        return list(self._sessions)
