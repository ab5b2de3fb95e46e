"""The embedded broker: everything in this process's memory.

It keeps the :class:`~server.brokers.base.Broker` promises with plain data
structures; because asyncio runs one callback at a time, an append with no
``await`` inside it is atomic.

Workflow leases are trivial here: the only process that can run a workflow is
this one, and its sessions live exactly as long as it does, so a lease is never
lost while anyone could ask. A lease is ``held`` from the claim until it is
released (its time-to-live is not even needed), and never ``lost``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection

from ..errors import IdempotencyKeyReused, SessionEnded
from ..messages import StoredEvent, StreamPosition, make_event_id
from .base import EventListener, IdempotencyKey, Lease, LeaseState, Repeated, Replay, SessionInfo


class _Stream:
    __slots__ = ("epoch", "events", "final_id", "keys", "last_seq", "touched")

    def __init__(self, buffer_size: int, now: float) -> None:
        self.epoch = secrets.token_hex(4)
        self.events: deque[StoredEvent] = deque(maxlen=buffer_size)
        self.last_seq = 0
        self.final_id: str | None = None
        self.touched = now
        # Idempotency key -> (seq, fingerprint), oldest first; made on the first keyed append.
        self.keys: dict[str, tuple[int, str]] | None = None

    def info(self) -> SessionInfo:
        return SessionInfo(self.epoch, self.last_seq, self.final_id is not None, self.final_id)


class MemoryBroker:
    """Per-session bounded deques; expired sessions are swept periodically."""

    def __init__(
        self,
        buffer_size: int,
        session_ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float | None = None,
    ) -> None:
        self._buffer_size = buffer_size
        self._ttl = session_ttl
        self._clock = clock
        self._sweep_interval = sweep_interval or max(1.0, min(60.0, session_ttl / 4))
        self._streams: dict[str, _Stream] = {}
        self._leases: dict[str, str] = {}  # session -> owner, from claim to release
        self._on_event: EventListener | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, on_event: EventListener) -> None:
        self._on_event = on_event
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-broker-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper})  # never swallows close()'s own cancellation
            self._sweeper = None

    async def append(
        self,
        session_id: str,
        type: str,
        body: str,
        final: bool,
        key: IdempotencyKey | None = None,
    ) -> StoredEvent:
        now = self._clock()
        stream = self._streams.get(session_id)
        if stream is None:
            stream = self._streams[session_id] = _Stream(self._buffer_size, now)
        else:
            if key is not None and stream.keys is not None and key.key in stream.keys:
                seq, fingerprint = stream.keys[key.key]
                if fingerprint != key.fingerprint:
                    raise IdempotencyKeyReused()
                raise Repeated(make_event_id(stream.epoch, seq), seq)
            if stream.final_id is not None:
                raise SessionEnded(session_id)
        stream.last_seq += 1
        event = StoredEvent(session_id, stream.epoch, stream.last_seq, type, final, body)
        stream.events.append(event)  # the deque's maxlen trims the oldest
        stream.touched = now
        if key is not None:
            if stream.keys is None:
                stream.keys = {}
            stream.keys[key.key] = (event.seq, key.fingerprint)
            if len(stream.keys) > self._buffer_size:
                del stream.keys[next(iter(stream.keys))]
        if final:
            stream.final_id = event.id
        if self._on_event is not None:
            # Every session is "watched" in one process: deliver straight away.
            self._on_event(event)
        return event

    async def read(
        self, session_id: str, after: StreamPosition | None, limit: int | None = None
    ) -> Replay:
        stream = self._streams.get(session_id)
        if stream is None:
            return Replay([], gap=after is not None, info=None)
        events = list(stream.events)
        start, gap = 0, False
        if after is not None:
            first_seq = events[0].seq if events else stream.last_seq + 1
            servable = (
                after.epoch == stream.epoch
                and after.seq <= stream.last_seq
                and after.seq >= first_seq - 1
            )
            if servable:
                start = after.seq - first_seq + 1
            else:
                gap = True  # every retained event
        end = None if limit is None else start + limit
        return Replay(events[start:end], gap=gap, info=stream.info())

    async def info(self, session_id: str) -> SessionInfo | None:
        stream = self._streams.get(session_id)
        return None if stream is None else stream.info()

    async def claim(self, session_id: str, lease: Lease | None = None) -> bool:
        if session_id in self._streams:
            return False
        self._streams[session_id] = _Stream(self._buffer_size, self._clock())
        if lease is not None:
            self._leases[session_id] = lease.owner
        return True

    async def renew_leases(self, session_ids: Collection[str], lease: Lease) -> set[str]:
        """Nothing expires while this process lives; a lease stays until released."""
        held = (s for s in session_ids if self._lease_state(s) == "held")
        return {s for s in held if self._leases[s] == lease.owner}

    async def release_lease(self, session_id: str, owner: str) -> None:
        if self._leases.get(session_id) == owner:
            del self._leases[session_id]

    async def lease_states(self, session_ids: Collection[str]) -> dict[str, LeaseState]:
        return {session_id: self._lease_state(session_id) for session_id in session_ids}

    def _lease_state(self, session_id: str) -> LeaseState:
        stream = self._streams.get(session_id)
        if stream is None:
            return "gone"
        if stream.final_id is not None:
            return "ended"
        return "held" if session_id in self._leases else "none"

    async def watch(self, session_id: str) -> None:
        """Nothing to do: every append is delivered in-process."""

    async def unwatch(self, session_id: str) -> None:
        """Nothing to do: every append is delivered in-process."""

    async def ping(self) -> bool:
        return True

    # --- expiry -------------------------------------------------------------------------

    def session_count(self) -> int:
        return len(self._streams)

    def sweep(self) -> int:
        """Forget sessions untouched for ``session_ttl``; return how many were dropped.

        A session whose workflow still runs here (its lease is held, no final event yet)
        is kept however long its agents stay silent: its history must outlive the run, as
        the Redis broker's lease renewals keep it there. Once it has ended, a lease left
        behind (a final event published by another service ends the run without a
        release) protects it no longer."""
        deadline = self._clock() - self._ttl
        expired = [
            sid
            for sid, s in self._streams.items()
            if s.touched <= deadline and self._lease_state(sid) != "held"
        ]
        for sid in expired:
            del self._streams[sid]
            self._leases.pop(sid, None)
        return len(expired)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()
