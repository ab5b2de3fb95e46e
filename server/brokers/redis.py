"""The Redis Streams broker: every server process serves any session.

Keys of one session share a hash tag (``{<session_id>}``) so they live in one
cluster slot and one Lua script may touch them all::

    <prefix>:{<sid>}:state    hash: epoch, seq (last seq), final (id), claimed, leased,
                              keyed, and "k:<idempotency key>" = "<seq>:<fingerprint>"
    <prefix>:{<sid>}:events   stream, entry id "<seq>-0", fields t f n b, MAXLEN = buffer_size
    <prefix>:{<sid>}:nonce-seqs  hash: nonce -> seq of the appends of the retry window,
                              expiring two windows after it began; a window old, renamed to
    <prefix>:{<sid>}:nonce-seqs-before  the one a retry looks in next
    <prefix>:{<sid>}:nonces   stream: written by earlier versions only, deleted with a life
    <prefix>:{<sid>}:keys     list: the idempotency keys of the state hash, oldest first
    <prefix>:{<sid>}:lease    string: the owner of the workflow lease, expiring after its ttl
    <prefix>:{<sid>}:live     pub/sub channel: "<seq>|<epoch>|<type>|<final>|<body>"

State and events expire ``session_ttl`` after the last append or lease renewal (a
running workflow's history outlives its agents' silences); the lease ``lease.ttl``
after its last renewal. Every write is one Lua script, so the next ``seq`` is
assigned, the entry stored, the stream trimmed, the expiry refreshed and the live
message published as one atomic step, whichever process appends. When the state
hash is gone (expired, or a Redis without persistence restarted empty) the next
append starts a new epoch, so an id from the earlier life of the stream is answered
with a gap.

The scripts are in :mod:`.redis_scripts`. Each process keeps one connection
(:mod:`.redis_live`) that carries both its appends and the live events of the
sessions it watches, and the appending process hands its own events to its hub as
soon as Redis has stored them. Replays, claims and lease checks use a pool of
ordinary connections; lease renewals have a small pool of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..errors import IdempotencyKeyReused, ServiceUnavailable, SessionEnded
from ..messages import StoredEvent, StreamPosition, make_event_id
from .base import EventListener, IdempotencyKey, Lease, LeaseState, Repeated, Replay, SessionInfo
from .batching import Batcher
from .redis_live import LiveChannels
from .redis_scripts import (
    APPEND_LUA,
    CLAIM_LUA,
    LEASE_STATE_LUA,
    LEASE_STATES,
    READ_LUA,
    RELEASE_LUA,
    RENEW_LUA,
)
from .resp import FAILURES, TRANSIENT, UNAVAILABLE_MESSAGE, RespStream, error_code

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sessions whose lease scripts go in one round trip (see RedisBroker._per_session).
_SESSIONS_PER_ROUND_TRIP = 100
# The renewals' own connections: one call per lease_ttl / 3; a second for a call
# whose attempt was cut off while the first is being given back.
_RENEWAL_CONNECTIONS = 2
# Sessions whose last stored position is remembered (see RedisBroker._note_stored): a
# running workflow's session stays among them unless this many others were appended to
# since its last event. About 200 bytes each.
_STORED_SESSIONS = 4096
# Appends that go in one pipeline (see RedisBroker._store_batch).
_APPENDS_PER_ROUND_TRIP = 64


def _is_noscript(answer: Any) -> bool:
    """Redis no longer has the script (``SCRIPT FLUSH``, or a restart)."""
    return isinstance(answer, ResponseError) and str(answer).startswith("NOSCRIPT")


@dataclass(slots=True)
class _Append:
    """One append waiting for its batch, with the script's keys and arguments (see
    APPEND_LUA)."""

    session_id: str
    type: str
    final: bool
    body: str
    keys: list[str]
    settings: list[Any]  # ARGV 4 to 9: maxlen, ttl_ms, fresh epoch, channel, nonce, window
    key: IdempotencyKey | None
    # How far this process has seen the stream go: the last event it stored and the last
    # it delivered, each (epoch, seq) or None.
    seen: tuple[tuple[str, int] | None, tuple[str, int] | None]

    def arguments(self, retry: bool) -> list[Any]:
        final = "1" if self.final else "0"
        retried = "1" if retry else "0"
        key = ("", "") if self.key is None else (self.key.key, self.key.fingerprint)
        seen = [part for position in self.seen for part in position or ("", 0)]
        return [self.type, final, self.body, *self.settings, retried, *key, *seen]

    def stored(self, epoch: str, seq: int) -> StoredEvent:
        return StoredEvent(self.session_id, epoch, seq, self.type, self.final, self.body)


def _log_lost_writes(session_id: str, seen_id: str, epoch: str) -> None:
    log.warning(
        "redis lost writes: session %s holds less than this process saw (up to %s); "
        "it goes on under a new epoch %s, and its subscribers are told of the gap",
        session_id,
        seen_id,
        epoch,
    )


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def new_epoch() -> str:
    """A fresh epoch: 48 random bits, hex (alphanumeric, as ids require)."""
    return secrets.token_hex(6)


class RedisBroker:
    """Redis Streams storage with one live connection per process.

    ``url`` is a ``redis://`` or ``rediss://`` URL (it may hold a password; it is
    never logged or shown). Timeouts are in seconds:

    * ``op_timeout``: one attempt of one call, the wait for a pooled
      connection included;
    * ``connect_timeout``: opening one connection;
    * ``retry_budget``: how long a call keeps retrying with exponential
      back-off while Redis cannot be reached, before it raises
      :class:`~server.errors.ServiceUnavailable`;
    * ``ping_timeout``: the readiness probe;
    * ``watch_timeout``: how long :meth:`watch` waits for Redis to confirm a
      subscription;
    * ``idle_ping``: the live connection's reader pings when it has heard nothing for
      this long, and reconnects when the ping goes unanswered as long again
      (a half-open TCP connection would otherwise stop live delivery silently).
    """

    def __init__(
        self,
        url: str,
        buffer_size: int,
        session_ttl: float,
        *,
        key_prefix: str = "orch",
        op_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        retry_budget: float = 3.0,
        ping_timeout: float = 1.0,
        watch_timeout: float = 5.0,
        idle_ping: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if session_ttl <= 0:
            raise ValueError("session_ttl must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._url = url
        self._buffer_size = buffer_size
        self._ttl_ms = max(1, math.ceil(session_ttl * 1000))
        self._prefix = key_prefix
        self._op_timeout = op_timeout
        self._connect_timeout = connect_timeout
        self._retry_budget = retry_budget
        # How long Redis keeps an append's nonce for its retries to find. The last retry
        # starts within retry_budget of the first attempt and runs for at most
        # op_timeout; twice that leaves room for a slow Redis.
        self._retry_window_ms = _milliseconds(2 * (retry_budget + op_timeout))
        self._ping_timeout = ping_timeout
        self._max_connections = max_connections

        self._client: Redis | None = None
        self._live_client: Redis | None = None
        self._renewal_client: Redis | None = None
        self._append_script: Any = None
        self._appends: Batcher[_Append, StoredEvent] | None = None
        self._read_script: Any = None
        self._claim_script: Any = None
        self._renew_script: Any = None
        self._release_script: Any = None
        self._lease_state_script: Any = None
        self._closed = False
        # The (epoch, seq) this process last stored, for the sessions it appended to most
        # recently. With the positions the live connection delivered, how far this
        # process has seen a stream go: a stream found behind that lost writes (see
        # APPEND_LUA), and takes a new epoch rather than reuse its seqs.
        self._stored: dict[str, tuple[str, int]] = {}
        self._live = LiveChannels(
            channel=self.channel,
            session_of=self._session_of,
            read=functools.partial(self._read, seen=True),
            connect_timeout=connect_timeout,
            op_timeout=op_timeout,
            watch_timeout=watch_timeout,
            idle_ping=idle_ping,
        )

    def __repr__(self) -> str:  # never show the URL: it may hold a password
        return f"RedisBroker(prefix={self._prefix!r}, buffer_size={self._buffer_size})"

    # --- keys -------------------------------------------------------------------------

    def _state_key(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:state"

    def _stream_key(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:events"

    def _lease_key(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:lease"

    def _nonces_key(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:nonces"

    def _nonce_seqs_key(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:nonce-seqs"

    def _earlier_nonce_seqs_key(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:nonce-seqs-before"

    def _keys_key(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:keys"

    def channel(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:live"

    def _session_of(self, channel: str) -> str | None:
        head = f"{self._prefix}:{{"
        if channel.startswith(head) and channel.endswith("}:live"):
            return channel[len(head) : -len("}:live")]
        return None

    # --- lifetime ---------------------------------------------------------------------

    def _make_client(self, max_connections: int, protocol: int) -> Redis:
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=max_connections,
            timeout=self._op_timeout,  # waiting for a free pooled connection
            decode_responses=True,
            # RESP3 for the live connection, which takes commands while subscribed
            # (redis_live.py); RESP2 for the pool, whose replies redis-py parses.
            protocol=protocol,
            # No socket_timeout: with one, redis-py sends through asyncio.wait_for, which on
            # Python 3.11 can swallow a cancellation. Each call is bounded with
            # asyncio.timeout instead (see _call, and LiveChannels in redis_live.py).
            socket_timeout=None,
            socket_connect_timeout=self._connect_timeout,
            socket_keepalive=True,
            # No hidden retries: a retried append is only safe through our own loop.
            retry=Retry(NoBackoff(), 0),
        )
        return Redis.from_pool(pool)

    async def start(self, on_event: EventListener) -> None:
        """Create the clients and start the live connection's reader. Redis need not be up yet:
        calls fail with ``ServiceUnavailable`` and the reader keeps reconnecting."""
        if self._client is not None:
            raise RuntimeError("RedisBroker.start() called twice")
        self._client = self._make_client(self._max_connections, protocol=2)
        self._live_client = self._make_client(1, protocol=3)
        # Renewals never wait in line for the pool behind replays and claims: in a storm
        # of 3,000 reconnecting clients they waited there for over a second, and a lease
        # of a few seconds lapsed under a workflow that was running.
        self._renewal_client = self._make_client(_RENEWAL_CONNECTIONS, protocol=2)
        self._append_script = self._client.register_script(APPEND_LUA)
        self._appends = Batcher(
            self._store_batch,
            max_batch=_APPENDS_PER_ROUND_TRIP,
            closed=lambda: ServiceUnavailable(UNAVAILABLE_MESSAGE),
        )
        self._read_script = self._client.register_script(READ_LUA)
        self._claim_script = self._client.register_script(CLAIM_LUA)
        self._renew_script = self._client.register_script(RENEW_LUA)
        self._release_script = self._client.register_script(RELEASE_LUA)
        self._lease_state_script = self._client.register_script(LEASE_STATE_LUA)
        self._live.start(self._live_client, on_event)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._live.close()
        if self._appends is not None:
            await self._appends.close()
        for client in (self._live_client, self._renewal_client, self._client):
            if client is not None:
                with contextlib.suppress(*FAILURES):
                    await client.aclose()
        self._client = self._live_client = self._renewal_client = None

    # --- commands ---------------------------------------------------------------------

    def _require_client(self) -> Redis:
        if self._client is None:
            raise ServiceUnavailable(UNAVAILABLE_MESSAGE)
        return self._client

    async def _call(self, what: str, attempt: Callable[[int], Awaitable[T]]) -> T:
        """Run ``attempt(n)`` (n = 0, 1, ...) until it succeeds, retrying transient
        failures with exponential back-off for at most ``retry_budget`` seconds."""
        deadline = time.monotonic() + self._retry_budget
        delay = 0.05
        tries = 0
        while True:
            try:
                async with asyncio.timeout(self._op_timeout):
                    return await attempt(tries)
            except TRANSIENT as exc:
                tries += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "redis %s failed after %d attempt(s): %s",
                        what,
                        tries,
                        type(exc).__name__,
                    )
                    raise ServiceUnavailable(UNAVAILABLE_MESSAGE) from None
                await asyncio.sleep(min(delay, remaining))  # back-off, not synchronisation
                delay = min(delay * 2, 1.0)
            except RedisError as exc:
                # Redis answered with an error (OOM, READONLY, NOPERM...): no retry.
                log.warning("redis %s refused: %s", what, error_code(exc))
                raise ServiceUnavailable(UNAVAILABLE_MESSAGE) from None

    async def append(
        self,
        session_id: str,
        type: str,
        body: str,
        final: bool,
        key: IdempotencyKey | None = None,
    ) -> StoredEvent:
        self._require_client()
        assert self._appends is not None
        request = self._append_request(session_id, type, body, final, key)
        return await self._appends.submit(request)

    def _append_request(
        self,
        session_id: str,
        type: str,
        body: str,
        final: bool,
        key: IdempotencyKey | None = None,
    ) -> _Append:
        keys = [
            self._state_key(session_id),
            self._stream_key(session_id),
            self._nonces_key(session_id),
            self._keys_key(session_id),
            self._nonce_seqs_key(session_id),
            self._earlier_nonce_seqs_key(session_id),
        ]
        settings = [self._buffer_size, self._ttl_ms, new_epoch(), self.channel(session_id)]
        settings.append(secrets.token_hex(6))  # the nonce a retry looks for
        settings.append(self._retry_window_ms)
        seen = (self._stored.get(session_id), self._live.delivered(session_id))
        return _Append(session_id, type, final, body, keys, settings, key, seen)

    async def _store_batch(self, batch: list[_Append]) -> list[StoredEvent | Exception]:
        """Run the append script for each append of the batch in one pipeline (one round
        trip), retrying the whole batch on transient failures: each append carries a
        nonce, so a retry finds what an earlier attempt stored instead of storing it twice.
        """
        client = self._require_client()

        async def attempt(n: int) -> list[Any]:
            return await self._run_appends(client, batch, retry=n > 0)

        answers = await self._call("append", attempt)
        results: list[StoredEvent | Exception] = []
        for request, answer in zip(batch, answers, strict=True):
            if isinstance(answer, Exception):
                # Redis refused this one script (OOM, READONLY...): no retry.
                log.warning("redis append refused: %s", error_code(answer))
                results.append(ServiceUnavailable(UNAVAILABLE_MESSAGE))
            elif answer[0] == 0:
                results.append(SessionEnded(request.session_id))
            elif answer[0] == 2:
                epoch, seq = str(answer[1]), int(answer[2])
                results.append(Repeated(make_event_id(epoch, seq), seq))
            elif answer[0] == 3:
                results.append(IdempotencyKeyReused())
            else:
                stored = request.stored(str(answer[1]), int(answer[2]))
                self._note_stored(stored)
                if answer[3]:
                    _log_lost_writes(request.session_id, str(answer[3]), stored.epoch)
                # This process's subscribers have it by now: Redis sends the event's pub/sub
                # message on the same connection, before this reply, and should a Redis send
                # them the other way round, it is delivered here. Whichever of the two comes
                # first delivers it; the other is dropped as a duplicate. An event another
                # process stored in between reaches the hub out of order, which it resyncs
                # from the stream.
                self._live.deliver(stored)
                results.append(stored)
        return results

    def _note_stored(self, event: StoredEvent) -> None:
        """Remember ``event`` as the newest this process stored in its session, for the
        ``_STORED_SESSIONS`` sessions appended to most recently (a dict keeps insertion
        order: re-inserted, a session is the newest; the oldest is dropped first)."""
        self._stored.pop(event.session_id, None)
        self._stored[event.session_id] = (event.epoch, event.seq)
        if len(self._stored) > _STORED_SESSIONS:
            del self._stored[next(iter(self._stored))]

    async def _run_appends(self, client: Redis, batch: list[_Append], retry: bool) -> list[Any]:
        """Write the batch's EVALSHA calls together on the live connection and return
        one answer per call. After a ``SCRIPT FLUSH`` or a restart of Redis the script
        is loaded again and the whole batch retried (see :meth:`_store_batch`)."""
        answers = await self._live.call(self._packed_appends(batch, retry))
        if any(_is_noscript(answer) for answer in answers):
            await client.script_load(APPEND_LUA)
            # Some appends of the batch may have run before the flush: they run as retries.
            answers = await self._live.call(self._packed_appends(batch, True))
        return answers

    def _packed_appends(self, batch: list[_Append], retry: bool) -> list[bytes]:
        sha = self._append_script.sha
        # hiredis packs in C: 2.5 µs a command here, against 16.6 for redis-py's packer.
        return [
            hiredis.pack_command(("EVALSHA", sha, 6, *r.keys, *r.arguments(retry))) for r in batch
        ]

    async def read(
        self, session_id: str, after: StreamPosition | None, limit: int | None = None
    ) -> Replay:
        await self._live.settled(session_id)
        return await self._read(session_id, after, limit=limit)

    async def _read(
        self,
        session_id: str,
        after: StreamPosition | None,
        seen: bool = False,
        limit: int | None = None,
    ) -> Replay:
        """``seen``: ``after`` is where this process's live connection stands, not a
        client's word, so a stream behind it lost writes (see READ_LUA). Should Redis
        refuse the new epoch's write (OOM, READONLY), the read fails, and with it the
        live connection's catch-up: it is tried again on the next connection, with
        back-off, until Redis takes it. (Reading the stream as it is instead would leave
        this process taking the events that reuse the lost seqs for ones it has.)"""
        client = self._require_client()
        keys = [self._state_key(session_id), self._stream_key(session_id)]
        args = ["", ""] if after is None else [after.epoch, str(after.seq)]
        args.append(str(limit or 0))
        if seen and after is not None:
            args.append(new_epoch())

        async def attempt(_: int) -> list[Any]:
            result: list[Any] = await self._read_script(keys=keys, args=args, client=client)
            return result

        result = await self._call("read", attempt)
        if not result:
            return Replay([], gap=after is not None, info=None)
        epoch, last_seq, final_id, gap, entries = result
        epoch = str(epoch)
        if gap == 2 and after is not None:
            _log_lost_writes(session_id, make_event_id(after.epoch, after.seq), epoch)
        info = SessionInfo(epoch, int(last_seq), bool(final_id), final_id or None)
        events = [self._event_from_entry(session_id, epoch, entry) for entry in entries]
        return Replay(events, gap=after is not None and bool(gap), info=info)

    @staticmethod
    def _event_from_entry(session_id: str, epoch: str, entry: list[Any]) -> StoredEvent:
        entry_id, flat = entry
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        seq = int(str(entry_id).partition("-")[0])
        return StoredEvent(session_id, epoch, seq, fields["t"], fields["f"] == "1", fields["b"])

    async def info(self, session_id: str) -> SessionInfo | None:
        client = self._require_client()
        key = self._state_key(session_id)

        async def attempt(_: int) -> list[Any]:
            result: list[Any] = await client.hmget(key, ["epoch", "seq", "final"])
            return result

        epoch, seq, final_id = await self._call("info", attempt)
        if epoch is None:
            return None
        return SessionInfo(str(epoch), int(seq or 0), final_id is not None, final_id)

    async def claim(self, session_id: str, lease: Lease | None = None) -> bool:
        client = self._require_client()
        keys = [
            self._state_key(session_id),
            self._stream_key(session_id),
            self._lease_key(session_id),
            self._nonces_key(session_id),
            self._keys_key(session_id),
            self._nonce_seqs_key(session_id),
            self._earlier_nonce_seqs_key(session_id),
        ]
        args = [new_epoch(), self._ttl_ms, secrets.token_hex(8)]
        args += ["", 0] if lease is None else [lease.owner, _milliseconds(lease.ttl)]

        async def attempt(_: int) -> int:
            result: int = await self._claim_script(keys=keys, args=args, client=client)
            return result

        return int(await self._call("claim", attempt)) == 1

    # --- workflow leases --------------------------------------------------------------

    async def _per_session(
        self,
        what: str,
        script: Any,
        session_ids: Collection[str],
        args: list[Any],
        keys: Callable[[str], list[str]],
        client: Redis | None = None,
    ) -> list[Any]:
        """Run a one-session script (it touches the keys of one session only: one hash
        slot) for each session, pipelined, ``_SESSIONS_PER_ROUND_TRIP`` at a time.

        The lease monitor asks this for every session the process streams, every
        ``lease_check_interval``. Through redis-py's pipeline, 1,000 sessions held the
        event loop for two stretches of about 10 ms each on the benchmark machine, the
        largest part of what Redis added to p99 with many sessions. Packed and parsed by
        hiredis (see :mod:`.resp`), a chunk at a time, the loop is never held for more
        than a fraction of a millisecond. The scripts may run twice (a retry, or after
        ``NOSCRIPT``): they only read, or set what they set before. ``client``: whose
        connections to use (the pool's by default). A session whose script Redis
        refuses has the refusal (a ``ResponseError``) as its answer."""
        pool = (client or self._require_client()).connection_pool
        ids = list(session_ids)
        if not ids:
            return []

        def packed(chunk: list[str]) -> list[bytes]:
            commands = []
            for session_id in chunk:
                session_keys = keys(session_id)
                command = ("EVALSHA", script.sha, len(session_keys), *session_keys, *args)
                commands.append(hiredis.pack_command(command))
            return commands

        async def attempt(_: int) -> list[Any]:
            stream = await RespStream.open(pool)
            answers: list[Any] = []
            try:
                for start in range(0, len(ids), _SESSIONS_PER_ROUND_TRIP):
                    chunk = ids[start : start + _SESSIONS_PER_ROUND_TRIP]
                    replies = await stream.call(packed(chunk))
                    if any(_is_noscript(reply) for reply in replies):
                        stream.send(("SCRIPT", "LOAD", script.script))
                        loaded = await stream.read()
                        if isinstance(loaded, ResponseError):
                            raise loaded  # not retried: see _call
                        replies = await stream.call(packed(chunk))
                    answers += replies
            except BaseException:
                await stream.close()
                raise
            await stream.release()
            return answers

        answers = await self._call(what, attempt)
        refused = [answer for answer in answers if isinstance(answer, ResponseError)]
        if refused:
            # One session's keys refused (a key of another type, written by something
            # else) must not fail the others' (every lease of the process would lapse);
            # all refused (OOM, NOPERM...) is a store that cannot serve.
            log.warning(
                "redis %s refused for %d of %d session(s): %s",
                what,
                len(refused),
                len(answers),
                error_code(refused[0]),
            )
            if len(refused) == len(answers):
                raise ServiceUnavailable(UNAVAILABLE_MESSAGE)
        return answers

    async def renew_leases(self, session_ids: Collection[str], lease: Lease) -> set[str]:
        ids = list(session_ids)
        args = [lease.owner, _milliseconds(lease.ttl), self._ttl_ms]

        def keys(s: str) -> list[str]:
            return [self._state_key(s), self._lease_key(s), self._stream_key(s), self._keys_key(s)]

        renewals = self._renewal_client
        if renewals is None:
            raise ServiceUnavailable(UNAVAILABLE_MESSAGE)
        script = self._renew_script
        answers = await self._per_session("renew", script, ids, args, keys, renewals)
        # A renewal refused for its session (OOM, READONLY refuse the ones that write,
        # not those that find the lease lost and write nothing) is not known to be lost.
        return {
            s
            for s, held in zip(ids, answers, strict=True)
            if held == 1 or isinstance(held, ResponseError)
        }

    async def release_lease(self, session_id: str, owner: str) -> None:
        client = self._require_client()
        keys = [self._lease_key(session_id)]

        async def attempt(_: int) -> int:
            result: int = await self._release_script(keys=keys, args=[owner], client=client)
            return result

        await self._call("release", attempt)

    async def lease_states(self, session_ids: Collection[str]) -> dict[str, LeaseState]:
        ids = list(session_ids)

        def keys(s: str) -> list[str]:
            return [self._state_key(s), self._lease_key(s)]

        script = self._lease_state_script
        answers = await self._per_session("lease states", script, ids, [], keys)
        states: dict[str, LeaseState] = {}
        for session_id, answer in zip(ids, answers, strict=True):
            if isinstance(answer, ResponseError):
                continue  # refused for this session alone: not known this time
            state = LEASE_STATES.get(str(answer))
            if state is None:  # never: the script answers one of them
                raise ServiceUnavailable(UNAVAILABLE_MESSAGE)
            states[session_id] = state
        return states

    async def ping(self) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            async with asyncio.timeout(self._ping_timeout):
                return bool(await client.ping())
        except FAILURES:
            return False

    # --- live delivery (redis_live.py) ------------------------------------------------

    async def watch(self, session_id: str) -> None:
        await self._live.watch(session_id)

    async def unwatch(self, session_id: str) -> None:
        await self._live.unwatch(session_id)
