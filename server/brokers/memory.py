"""The embedded broker: everything in this process's memory.

It keeps the :class:`~server.brokers.base.Broker` promises with plain data
structures; because asyncio runs one callback at a time, an append with no
``await`` inside it is atomic.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable

from ..errors import SessionEnded
from ..messages import StoredEvent, StreamPosition
from .base import EventListener, Replay, SessionInfo


class _Stream:
    __slots__ = ("epoch", "events", "final_id", "last_seq", "touched")

    def __init__(self, buffer_size: int, now: float) -> None:
        self.epoch = secrets.token_hex(4)
        self.events: deque[StoredEvent] = deque(maxlen=buffer_size)
        self.last_seq = 0
        self.final_id: str | None = None
        self.touched = now

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

    async def append(self, session_id: str, type: str, body: str, final: bool) -> StoredEvent:
        now = self._clock()
        stream = self._streams.get(session_id)
        if stream is None:
            stream = self._streams[session_id] = _Stream(self._buffer_size, now)
        elif stream.final_id is not None:
            raise SessionEnded(session_id)
        stream.last_seq += 1
        event = StoredEvent(session_id, stream.epoch, stream.last_seq, type, final, body)
        stream.events.append(event)  # the deque's maxlen trims the oldest
        stream.touched = now
        if final:
            stream.final_id = event.id
        if self._on_event is not None:
            # Every session is "watched" in one process: deliver straight away.
            self._on_event(event)
        return event

    async def read(self, session_id: str, after: StreamPosition | None) -> Replay:
        stream = self._streams.get(session_id)
        if stream is None:
            return Replay([], gap=after is not None, info=None)
        events = list(stream.events)
        info = stream.info()
        if after is None:
            return Replay(events, gap=False, info=info)
        first_seq = events[0].seq if events else stream.last_seq + 1
        servable = (
            after.epoch == stream.epoch
            and after.seq <= stream.last_seq
            and after.seq >= first_seq - 1
        )
        if not servable:
            return Replay(events, gap=True, info=info)
        return Replay(events[after.seq - first_seq + 1 :], gap=False, info=info)

    async def info(self, session_id: str) -> SessionInfo | None:
        stream = self._streams.get(session_id)
        return None if stream is None else stream.info()

    async def claim(self, session_id: str) -> bool:
        if session_id in self._streams:
            return False
        self._streams[session_id] = _Stream(self._buffer_size, self._clock())
        return True

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
        """Forget sessions untouched for ``session_ttl``; return how many were dropped."""
        deadline = self._clock() - self._ttl
        expired = [sid for sid, s in self._streams.items() if s.touched <= deadline]
        for sid in expired:
            del self._streams[sid]
        return len(expired)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()
