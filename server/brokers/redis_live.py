"""The Redis broker's live connection: this process's one connection that carries both
the live events of the sessions it watches and its appends.

:meth:`LiveChannels.watch` subscribes to a session's channel and returns once Redis
has confirmed the subscription, so an event stored after it returns is delivered
live (the hub reads its replay after that). One reader task passes each message to
the hub's listener in order and drops duplicates; after a reconnect it subscribes
again and catches up from the stream what it may have missed while it was away.
The appending process hands its own events over too (:meth:`LiveChannels.deliver`),
as soon as Redis has stored them: whichever of the two comes first delivers an
event, and the other is dropped as a duplicate.

Why one connection for both: the connection speaks RESP3, where a subscribed
connection still takes commands and live messages arrive as push replies, told
apart from the commands' own replies by their type. An append's script publishes
the event, so its live message and the script's reply come back on the same
socket, in one read: the server wakes once per event instead of once per
connection. Measured (at a fixed rate of 1,000 events/s, one process), that is
about 45 µs of CPU less per event than with two connections.

Redis answers a connection's commands in the order they were written, so calls
need not wait for each other: each write records what Redis owes it (one reply, or
one confirmation push per channel of a SUBSCRIBE or UNSUBSCRIBE), and the reader
settles those in order. Live messages owe nothing and may arrive between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ..errors import ServiceUnavailable
from ..messages import StoredEvent, StreamPosition
from .base import EventListener, Replay
from .liveness import SilenceWatch
from .resp import FAILURES, UNAVAILABLE_MESSAGE, RespStream, error_code

log = logging.getLogger(__name__)

# What ends one life of the connection (a catch-up read may raise ServiceUnavailable).
_LOST: tuple[type[BaseException], ...] = (*FAILURES, ServiceUnavailable)


class _Confirmations:
    """What a SUBSCRIBE or UNSUBSCRIBE is owed: one push per channel, or one error."""

    __slots__ = ("channels", "command", "left")

    def __init__(self, command: str, channels: list[str]) -> None:
        self.command = command
        self.channels = channels
        self.left = len(channels)


# What Redis owes for one command written on the connection: the future of the call
# waiting for its reply, ``None`` for a reply nobody waits for (a PING), or the
# confirmations of a SUBSCRIBE or UNSUBSCRIBE.
_Owed: TypeAlias = "asyncio.Future[Any] | _Confirmations | None"


class _Life:
    """One connection, its silence watch, and what Redis still owes it, oldest first."""

    __slots__ = ("owed", "stream", "watch")

    def __init__(self, stream: RespStream, idle_ping: float) -> None:
        self.stream = stream
        self.owed: deque[_Owed] = deque()
        self.watch = SilenceWatch(stream, idle_ping, self.ping)

    def write(self, packed: list[bytes], owed: Iterable[_Owed]) -> None:
        # Nothing awaited between the two: the order owed is the order on the wire.
        self.owed.extend(owed)
        self.stream.write(packed)

    def subscription(self, command: str, channels: list[str]) -> None:
        """Write a SUBSCRIBE or UNSUBSCRIBE of ``channels``."""
        self.write(_packed(command, *channels), [_Confirmations(command, channels)])

    def ping(self) -> None:
        self.write(_packed("PING"), [None])

    def answer(self, reply: Any) -> _Confirmations | None:
        """A command's reply (an error reply included) goes to the oldest command owed.
        Returns the SUBSCRIBE or UNSUBSCRIBE that ``reply`` refused, if it did."""
        if not self.owed:
            raise RedisConnectionError("a reply nothing was waiting for: out of step")
        head = self.owed.popleft()
        if isinstance(head, _Confirmations):
            if isinstance(reply, ResponseError) and head.left == len(head.channels):
                return head  # refused as a whole (NOPERM...): the stream is still in step
            raise RedisConnectionError("a reply where a confirmation was due: out of step")
        if head is not None and not head.done():  # its caller may have been cancelled
            head.set_result(reply)
        return None

    def confirm(self) -> None:
        """One channel of the oldest SUBSCRIBE or UNSUBSCRIBE owed is confirmed."""
        head = self.owed[0] if self.owed else None
        if not isinstance(head, _Confirmations):
            raise RedisConnectionError("a confirmation nothing was waiting for: out of step")
        head.left -= 1
        if not head.left:
            self.owed.popleft()

    def fail(self, error: BaseException) -> None:
        """The connection is gone: every call still waiting on it fails with ``error``."""
        while self.owed:
            owed = self.owed.popleft()
            if isinstance(owed, asyncio.Future) and not owed.done():
                owed.set_exception(error)


class LiveChannels:
    """The sessions this process watches, the connection their channels and the appends
    share, and its reader.

    ``channel`` and ``session_of`` name a session's channel and back; ``read`` reads a
    session's stream after a position this connection delivered (for the catch-up: a
    stream found behind it lost writes, and takes a new epoch). Timeouts are the broker's
    (see :class:`~server.brokers.redis.RedisBroker`).
    """

    def __init__(
        self,
        *,
        channel: Callable[[str], str],
        session_of: Callable[[str], str | None],
        read: Callable[[str, StreamPosition | None], Awaitable[Replay]],
        connect_timeout: float,
        op_timeout: float,
        watch_timeout: float,
        idle_ping: float,
    ) -> None:
        self._channel = channel
        self._session_of = session_of
        self._read = read
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
        self._life: _Life | None = None  # set while the reader is connected
        self._connected = asyncio.Event()  # set while _life is (or once closed)
        self._wanted = asyncio.Event()  # a call is waiting: reconnect without back-off
        self._unreachable = False  # the reader's last attempt to connect failed
        self._sub_lock = asyncio.Lock()  # orders SUBSCRIBE/UNSUBSCRIBE on the wire
        # Per channel, one entry per SUBSCRIBE sent, holding the watchers it satisfies.
        self._inflight: dict[str, deque[list[asyncio.Future[None]]]] = {}
        self._delivered: dict[str, tuple[str, int]] = {}  # session -> (epoch, seq) delivered
        self._catch_up: set[str] = set()  # sessions that may have missed messages
        # Sessions being caught up, with the live events that came meanwhile, held back
        # so that they reach the listener after the ones caught up.
        self._held_back: dict[str, list[StoredEvent]] = {}
        self._catch_ups: set[asyncio.Task[None]] = set()
        self.connections = 0  # connections made so far (for logs and tests)

    def start(self, client: Redis, on_event: EventListener) -> None:
        """Start the reader on a connection from ``client``'s pool, which must speak RESP3;
        Redis need not be up yet: the reader keeps reconnecting."""
        self._client = client
        self._on_event = on_event
        self._reader = asyncio.create_task(self._read_forever(), name="redis-broker-reader")

    async def close(self) -> None:
        self._closed = True
        self._connected.set()  # calls waiting for a connection fail
        reader, self._reader = self._reader, None
        if reader is not None:
            # Cancel until it is done: a cancellation can be lost inside a library
            # call, and our own cancellation must still propagate (asyncio.wait).
            while not reader.done():
                reader.cancel()
                await asyncio.wait({reader}, timeout=1.0)
            if not reader.cancelled() and reader.exception() is not None:
                log.error("redis live reader had failed", exc_info=reader.exception())
        if self._catch_ups:  # cancelled when the reader ended
            await asyncio.wait(set(self._catch_ups))
        for batches in self._inflight.values():
            for batch in batches:
                for future in batch:
                    if not future.done():  # a watch still waiting: it fails, not "cancelled"
                        future.set_exception(ServiceUnavailable(UNAVAILABLE_MESSAGE))
        self._inflight.clear()

    # --- calls ------------------------------------------------------------------------

    async def call(self, packed: list[bytes]) -> list[Any]:
        """Write the packed commands and return their replies, in order; an error reply
        is returned as its ``ResponseError``, not raised. While the connection is down
        this waits for the next one: the caller bounds the wait. Raises
        ``RedisConnectionError`` when the connection is lost before every reply came."""
        life = await self._connection()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in packed]
        life.write(packed, futures)
        written = loop.time()
        try:
            await life.stream.drain()
            return [await future for future in futures]
        except BaseException as failure:
            for future in futures:
                # Pending: its reply is dropped when it comes. Failed: one error is
                # raised for the call, and asyncio need not log the others as unread.
                if not future.cancel() and not future.cancelled():
                    future.exception()
            if not isinstance(failure, asyncio.CancelledError):
                raise
            # Given up on (the caller's time limit) after half of ``op_timeout`` with
            # nothing at all heard on the connection since: it is most likely half-open,
            # and the retry should not wait on it for the silence watch's ping.
            if life.watch.heard < written and loop.time() - written >= self._op_timeout / 2:
                life.stream.abort()
            raise

    async def _connection(self) -> _Life:
        while True:
            if self._closed:
                raise RedisConnectionError("the Redis broker is closed")
            life = self._life
            if life is not None:
                return life
            self._wanted.set()
            if self._unreachable:
                # Fail now rather than wait out the caller's time limit: the caller
                # backs off and retries (within its retry budget), and each retry wakes
                # the reader to try again.
                raise RedisConnectionError("Redis cannot be reached")
            await self._connected.wait()

    # --- watching ---------------------------------------------------------------------

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
            batches = self._inflight.setdefault(channel, deque())
            life = self._life
            if life is None and batches:
                # No connection, so no SUBSCRIBE goes out now: the reconnect's confirms
                # every watcher still waiting. Joined to those (less the ones that gave
                # up), so that watches retried all through an outage do not pile up.
                batches[-1][:] = [f for f in batches[-1] if not f.done()] + [future]
            else:
                batches.append([future])
            if life is not None:
                try:
                    life.subscription("SUBSCRIBE", [channel])
                    await life.stream.drain()
                except FAILURES:
                    # The reader sees the broken connection too; on reconnect it
                    # subscribes every watched session and resolves this future.
                    log.debug("subscribe failed; waiting for the reader to reconnect")
            else:
                self._wanted.set()
        try:
            # Not wait_for, which can swallow a cancellation (see RedisBroker._make_client).
            async with asyncio.timeout(self._watch_timeout):
                await future
        except TimeoutError:
            raise ServiceUnavailable(UNAVAILABLE_MESSAGE) from None

    def delivered(self, session_id: str) -> tuple[str, int] | None:
        """The (epoch, seq) of the newest event delivered for a watched session."""
        return self._delivered.get(session_id)

    async def unwatch(self, session_id: str) -> None:
        """Unsubscribe; never raises (the next reconnect only subscribes watched sessions)."""
        self._watched.discard(session_id)
        self._delivered.pop(session_id, None)
        self._catch_up.discard(session_id)
        self._held_back.pop(session_id, None)
        async with self._sub_lock:
            life = self._life
            if session_id in self._watched or life is None:
                return  # watched again meanwhile, or nothing to undo on the wire
            with contextlib.suppress(*FAILURES):
                life.subscription("UNSUBSCRIBE", [self._channel(session_id)])
                await life.stream.drain()

    async def settled(self, session_id: str) -> None:
        """Wait (bounded) until a subscription in flight for this session is confirmed.

        A second local subscriber does not call ``watch``: without this its replay
        could be read before the first subscriber's SUBSCRIBE took effect."""
        batches = self._inflight.get(self._channel(session_id))
        pending = [f for batch in batches or () for f in batch if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=self._watch_timeout)

    # --- the reader -------------------------------------------------------------------

    async def _connect(self) -> RespStream:
        """Open the connection (a seam for tests that hold a reconnect back)."""
        assert self._client is not None
        async with asyncio.timeout(self._connect_timeout + self._op_timeout):
            return await RespStream.open(self._client.connection_pool)

    async def _read_forever(self) -> None:
        delay = 0.05
        failing = False  # log the first failure of a run of them, not every retry
        while not self._closed:
            life: _Life | None = None
            try:
                life = _Life(await self._connect(), self._idle_ping)
                await self._resubscribe(life)
                self.connections += 1
                if failing:
                    log.info("redis live connection restored")
                failing, delay = False, 0.05
                await self._pump(life)
            except asyncio.CancelledError:
                raise
            except _LOST as exc:
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "redis live connection lost: %s", type(exc).__name__)
                failing = True
            except Exception:
                log.exception("redis live reader failed; reconnecting")
                failing = True
            finally:
                if self._life is not None:
                    # Whatever was subscribed may have missed messages meanwhile.
                    self._catch_up.update(self._watched)
                elif not self._closed:
                    # This attempt never got connected: the calls waiting for it fail now
                    # (see _connection), woken by setting the event they wait on, which
                    # is cleared again below.
                    self._unreachable = True
                    self._connected.set()
                self._life = None
                for task in self._catch_ups:  # they start again on the next connection
                    task.cancel()
                if not self._closed:
                    self._connected.clear()
                if life is not None:
                    life.watch.stop()
                    # Retried by the broker: each append carries a nonce (see redis.py).
                    life.fail(RedisConnectionError("the live connection was lost"))
                    with contextlib.suppress(*FAILURES):
                        await life.stream.close()
            await self._back_off(delay)
            delay = min(delay * 2, 2.0)

    async def _back_off(self, delay: float) -> None:
        """Wait ``delay`` before connecting again, or less once a call is waiting (the
        calls back off themselves)."""
        self._wanted.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wanted.wait()

    async def _resubscribe(self, life: _Life) -> None:
        """Subscribe every watched session, and make the connection the one calls are
        written on. Each watcher still waiting is satisfied by its channel's
        confirmation on this connection."""
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
                life.subscription("SUBSCRIBE", channels)
                await life.stream.drain()
            self._life = life
            self._unreachable = False
            self._connected.set()

    async def _pump(self, life: _Life) -> None:
        loop = asyncio.get_running_loop()
        watch = life.watch
        while True:
            try:
                reply = await life.stream.read()
            except RedisConnectionError:
                if watch.silent:
                    raise RedisConnectionError("live connection silent") from None
                raise
            watch.heard = loop.time()
            if not isinstance(reply, hiredis.PushNotification):
                refused = life.answer(reply)
                if refused is not None:
                    self._on_refused(refused, reply, life)
                continue
            # RESP3 pushes: [message, channel, data], [subscribe, channel, count],
            # [unsubscribe, channel, count].
            kind = reply[0]
            if kind == "message":
                self._on_message(reply[1], reply[2])
            elif kind == "unsubscribe":
                life.confirm()
            elif kind == "subscribe":
                life.confirm()
                self._on_subscribed(reply[1], life)

    def _on_refused(self, refused: _Confirmations, error: ResponseError, life: _Life) -> None:
        """Redis refused a SUBSCRIBE (an ACL without the channel, say): its watchers fail.
        The connection is kept: it carries the other sessions and the appends. A SUBSCRIBE
        of several channels (after a reconnect) is refused whole for one forbidden
        channel, so each still watched is sent again on its own, and only those refused
        then fail."""
        log.warning("redis refused %s: %s", refused.command, error_code(error))
        if refused.command != "SUBSCRIBE":
            return
        if len(refused.channels) > 1:
            for channel in refused.channels:
                if self._session_of(channel) in self._watched:
                    life.subscription("SUBSCRIBE", [channel])
                else:
                    self._settle(channel)  # unwatched meanwhile: nothing to wait for
            return
        (channel,) = refused.channels
        self._settle(channel, ServiceUnavailable(UNAVAILABLE_MESSAGE))

    def _settle(self, channel: str, error: BaseException | None = None) -> None:
        """The oldest SUBSCRIBE of ``channel`` in flight is done: its watchers return, or
        raise ``error`` if Redis refused it."""
        batches = self._inflight.get(channel)
        if batches:
            for future in batches.popleft():
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
            if not batches:
                del self._inflight[channel]

    def _on_subscribed(self, channel: str, life: _Life) -> None:
        self._settle(channel)
        session_id = self._session_of(channel)
        if session_id is not None and session_id in self._catch_up:
            self._catch_up.discard(session_id)
            held: list[StoredEvent] = []
            self._held_back[session_id] = held
            task = asyncio.create_task(self._catch_up_session(session_id, held, life))
            self._catch_ups.add(task)
            task.add_done_callback(self._catch_ups.discard)

    async def _catch_up_session(
        self, session_id: str, held: list[StoredEvent], life: _Life
    ) -> None:
        """After a reconnect: deliver what was stored while the reader was away, then
        the live events held back meanwhile (duplicates dropped by ``seq``).

        Runs beside the reader, which goes on reading the connection: the appends'
        replies and the other sessions' events do not wait for it. If the read fails,
        the connection is dropped, and the next one catches every session up again.
        """
        try:
            delivered = self._delivered.get(session_id)
            after = None if delivered is None else StreamPosition(*delivered)
            held_before_read = len(held)
            replay = await self._read(session_id, after)
        except _LOST:
            life.stream.abort()
            return
        finally:
            if self._held_back.get(session_id) is held:
                del self._held_back[session_id]
        for event in (*replay.events, *replay.still_news(held, held_before_read)):
            self._deliver_now(event)

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
        """Hand a watched session's event to the listener, unless it already had it; held
        back while the session is being caught up."""
        held = self._held_back.get(event.session_id)
        if held is not None:
            held.append(event)
        else:
            self._deliver_now(event)

    def _deliver_now(self, event: StoredEvent) -> None:
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


def _packed(*command: Any) -> list[bytes]:
    return [hiredis.pack_command(command)]
