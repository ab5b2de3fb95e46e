"""Live delivery for the Redis broker: this process's one pub/sub connection.

:meth:`LiveChannels.watch` subscribes to a session's channel and returns once Redis
has confirmed the subscription, so an event stored after it returns is delivered
live (the hub reads its replay after that). One reader task passes each message to
the hub's listener in order and drops duplicates; after a reconnect it subscribes
again and catches up from the stream what it may have missed while it was away.
The appending process hands its own events over too (:meth:`LiveChannels.deliver`),
as soon as Redis has stored them: whichever of the two comes first delivers an
event, and the other is dropped as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ..errors import ServiceUnavailable
from ..messages import StoredEvent, StreamPosition
from .base import EventListener, Replay
from .liveness import SilenceWatch
from .resp import FAILURES, UNAVAILABLE_MESSAGE, RespStream

log = logging.getLogger(__name__)

# What ends one life of the pub/sub connection (a catch-up read may raise ServiceUnavailable).
_LOST: tuple[type[BaseException], ...] = (*FAILURES, ServiceUnavailable)


class LiveChannels:
    """The sessions this process watches, and the reader of their channels.

    ``channel`` and ``session_of`` name a session's channel and back; ``read`` reads a
    session's stream after a position (for the catch-up). Timeouts are the broker's
    (see :class:`~server.brokers.redis.RedisBroker`).
    """

    def __init__(
        self,
        *,
        channel: Callable[[str], str],
        session_of: Callable[[str], str | None],
        read: Callable[[str, StreamPosition | None], Awaitable[Replay]],
        control_channel: str,
        connect_timeout: float,
        op_timeout: float,
        watch_timeout: float,
        idle_ping: float,
    ) -> None:
        self._channel = channel
        self._session_of = session_of
        self._read = read
        self._control_channel = control_channel
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout
        self._watch_timeout = watch_timeout
        self._idle_ping = idle_ping

        # All touched from the event loop only.
        self._client: Redis | None = None
        self._on_event: EventListener | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._watched: set[str] = set()
        self._pubsub: RespStream | None = None  # set while the reader is connected
        self._sub_lock = asyncio.Lock()  # orders SUBSCRIBE/UNSUBSCRIBE on the wire
        # Per channel, one entry per SUBSCRIBE sent, holding the watchers it satisfies.
        self._inflight: dict[str, deque[list[asyncio.Future[None]]]] = {}
        self._delivered: dict[str, tuple[str, int]] = {}  # session -> (epoch, seq) delivered
        self._catch_up: set[str] = set()  # sessions that may have missed messages
        self.connections = 0  # pub/sub connections made so far (for logs and tests)

    def start(self, client: Redis, on_event: EventListener) -> None:
        """Start the reader on a connection from ``client``'s pool; Redis need not be up
        yet: the reader keeps reconnecting."""
        self._client = client
        self._on_event = on_event
        self._reader = asyncio.create_task(self._read_forever(), name="redis-broker-reader")

    async def close(self) -> None:
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            # Cancel until it is done: a cancellation can be lost inside a library
            # call, and our own cancellation must still propagate (asyncio.wait).
            while not reader.done():
                reader.cancel()
                await asyncio.wait({reader}, timeout=1.0)
            if not reader.cancelled() and reader.exception() is not None:
                log.error("redis pub/sub reader had failed", exc_info=reader.exception())
        for batches in self._inflight.values():
            for batch in batches:
                for future in batch:
                    if not future.done():  # a watch still waiting: it fails, not "cancelled"
                        future.set_exception(ServiceUnavailable(UNAVAILABLE_MESSAGE))
        self._inflight.clear()

    # --- watching -----------------------------------------------------------------------

    async def watch(self, session_id: str) -> None:
        """Subscribe this process to the session's live channel; return once Redis has
        confirmed it (so nothing stored afterwards is missed). Raises
        ``ServiceUnavailable`` if that does not happen within ``watch_timeout``."""
        if self._closed:
            return
        self._watched.add(session_id)
        channel = self._channel(session_id)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        async with self._sub_lock:
            # Registered before sending: the confirmation may be read while we await.
            self._inflight.setdefault(channel, deque()).append([future])
            pubsub = self._pubsub
            if pubsub is not None:
                try:
                    pubsub.send(("SUBSCRIBE", channel))
                    await pubsub.drain()
                except FAILURES:
                    # The reader sees the broken connection too; on reconnect it
                    # subscribes every watched session and resolves this future.
                    log.debug("subscribe failed; waiting for the reader to reconnect")
        try:
            # Not wait_for, which can swallow a cancellation (see RedisBroker._make_client).
            async with asyncio.timeout(self._watch_timeout):
                await future
        except TimeoutError:
            raise ServiceUnavailable(UNAVAILABLE_MESSAGE) from None

    async def unwatch(self, session_id: str) -> None:
        """Unsubscribe; never raises (the next reconnect only subscribes watched sessions)."""
        self._watched.discard(session_id)
        self._delivered.pop(session_id, None)
        self._catch_up.discard(session_id)
        async with self._sub_lock:
            pubsub = self._pubsub
            if session_id in self._watched or pubsub is None:
                return  # watched again meanwhile, or nothing to undo on the wire
            with contextlib.suppress(*FAILURES):
                pubsub.send(("UNSUBSCRIBE", self._channel(session_id)))
                await pubsub.drain()

    async def settled(self, session_id: str) -> None:
        """Wait (bounded) until a subscription in flight for this session is confirmed.

        A second local subscriber does not call ``watch``: without this its replay
        could be read before the first subscriber's SUBSCRIBE took effect."""
        batches = self._inflight.get(self._channel(session_id))
        pending = [f for batch in batches or () for f in batch if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=self._watch_timeout)

    # --- the reader ---------------------------------------------------------------------

    async def _open_pubsub(self) -> RespStream:
        """Connect the pub/sub connection (a seam for tests that hold a reconnect back)."""
        assert self._client is not None
        async with asyncio.timeout(self._connect_timeout + self._op_timeout):
            pubsub = await RespStream.open(self._client.connection_pool)
        pubsub.send(("SUBSCRIBE", self._control_channel))  # keeps it in subscribed mode
        return pubsub

    async def _read_forever(self) -> None:
        delay = 0.05
        failing = False  # log the first failure of a run of them, not every retry
        while not self._closed:
            pubsub: RespStream | None = None
            try:
                pubsub = await self._open_pubsub()
                await self._resubscribe(pubsub)
                self.connections += 1
                if failing:
                    log.info("redis pub/sub connection restored")
                failing, delay = False, 0.05
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except _LOST as exc:
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "redis pub/sub connection lost: %s", type(exc).__name__)
                failing = True
            except Exception:
                log.exception("redis pub/sub reader failed; reconnecting")
                failing = True
            finally:
                if self._pubsub is not None:
                    # Whatever was subscribed may have missed messages meanwhile.
                    self._catch_up.update(self._watched)
                self._pubsub = None
                if pubsub is not None:
                    with contextlib.suppress(*FAILURES):
                        await pubsub.close()
            await asyncio.sleep(delay)  # reconnect back-off
            delay = min(delay * 2, 2.0)

    async def _resubscribe(self, pubsub: RespStream) -> None:
        """Subscribe every watched session; each watcher still waiting is satisfied by
        its channel's confirmation on this connection."""
        async with self._sub_lock:
            old, self._inflight = self._inflight, {}
            for channel, batches in old.items():
                waiting = [f for batch in batches for f in batch if not f.done()]
                session_id = self._session_of(channel)
                if session_id not in self._watched:
                    for future in waiting:
                        future.set_result(None)  # unwatched meanwhile: nothing to wait for
                elif waiting:
                    self._inflight[channel] = deque([waiting])
            channels = [self._channel(s) for s in sorted(self._watched)]
            for channel in channels:
                self._inflight.setdefault(channel, deque([[]]))
            if channels:
                pubsub.send(("SUBSCRIBE", *channels))
                await pubsub.drain()
            self._pubsub = pubsub

    async def _pump(self, pubsub: RespStream) -> None:
        loop = asyncio.get_running_loop()
        watch = SilenceWatch(pubsub, self._idle_ping)
        try:
            while True:
                try:
                    reply = await pubsub.read()
                except RedisConnectionError:
                    if watch.silent:
                        raise RedisConnectionError("pub/sub connection silent") from None
                    raise
                watch.heard = loop.time()
                if isinstance(reply, ResponseError):
                    raise reply  # a refused SUBSCRIBE (NOPERM...): reconnect and log it
                # RESP2 arrays: [message, channel, data], [subscribe, channel, count],
                # [unsubscribe, channel, count], [pong, ""].
                kind = reply[0]
                if kind == "message":
                    self._on_message(reply[1], reply[2])
                elif kind == "subscribe":
                    # A catch-up read may take a while: the socket is not read meanwhile.
                    watch.busy = True
                    await self._on_subscribed(reply[1])
                    watch.busy = False
                    watch.heard = loop.time()
        finally:
            watch.stop()

    async def _on_subscribed(self, channel: str) -> None:
        batches = self._inflight.get(channel)
        if batches:
            for future in batches.popleft():
                if not future.done():
                    future.set_result(None)
            if not batches:
                del self._inflight[channel]
        session_id = self._session_of(channel)
        if session_id is not None and session_id in self._catch_up:
            self._catch_up.discard(session_id)
            await self._catch_up_session(session_id)

    async def _catch_up_session(self, session_id: str) -> None:
        """After a reconnect: deliver what was stored while the reader was away.

        Runs on the reader task after the channel is subscribed again, so
        messages that arrive meanwhile wait in the socket and are deduplicated
        by ``seq`` when they are read.
        """
        delivered = self._delivered.get(session_id)
        after = None if delivered is None else StreamPosition(*delivered)
        replay = await self._read(session_id, after)
        for event in replay.events:
            self.deliver(event)

    def _on_message(self, channel: str, data: str) -> None:
        session_id = self._session_of(channel)
        if session_id is None:
            return
        try:
            seq_text, epoch, type_, final_flag, body = data.split("|", 4)
            event = StoredEvent(session_id, epoch, int(seq_text), type_, final_flag == "1", body)
        except ValueError:
            log.warning("ignored a malformed live message on %s", channel)
            return
        self.deliver(event)

    def deliver(self, event: StoredEvent) -> None:
        """Hand a watched session's event to the listener, unless it already had it."""
        if event.session_id not in self._watched or self._on_event is None:
            return
        last = self._delivered.get(event.session_id)
        if last is not None and last[0] == event.epoch and event.seq <= last[1]:
            return  # already delivered (live and catch-up overlap)
        self._delivered[event.session_id] = (event.epoch, event.seq)
        try:
            self._on_event(event)
        except Exception:
            log.exception("event listener failed for a session's event")
