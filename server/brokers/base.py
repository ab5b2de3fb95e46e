"""The broker: where a session's stored events live, and how they reach every process.

The hub is the only caller. It never knows which broker it runs on: the
in-memory one (one process) and the Redis Streams one (many processes) keep
the same promises, written on each method below, and go through the same
delivery path (:data:`EventListener`), so the hub's tests cover both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..messages import StoredEvent, StreamPosition

EventListener = Callable[[StoredEvent], None]
"""Called by the broker for each stored event of a watched session, in ``seq`` order
per session. It must not block: the hub only appends to in-memory queues."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What :meth:`Broker.read` returns.

    ``events``: the retained events after the requested position, oldest first.
    ``gap``: the requested position could not be served (trimmed, an earlier
    epoch, ahead of the stream, or the stream does not exist); ``events`` then
    holds every retained event, and the subscriber must be told (``replay_gap``).
    """

    events: list[StoredEvent]
    gap: bool
    info: SessionInfo | None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """The state of one session's stream."""

    epoch: str
    last_seq: int  # seq of the newest stored event; 0 for a claimed stream with no event
    ended: bool  # the final event has been stored; nothing more will be
    final_id: str | None  # id of the final event, when ended


class Broker(Protocol):
    """Storage and cross-process delivery of stored events.

    Guarantees every implementation keeps:

    * per session, ``seq`` is 1, 2, 3 ... without gaps, assigned atomically with
      the append, whichever process appends;
    * at most ``buffer_size`` events are retained per session, the newest;
    * nothing is appended after an event with ``final=True``;
    * a session is forgotten (events, epoch, state) ``session_ttl`` seconds
      after its last append; a stream created again after that gets a new epoch.
    """

    async def start(self, on_event: EventListener) -> None:
        """Connect, and from now on pass every event stored into a watched session
        (by this or any other process) to ``on_event``, each once, in ``seq`` order
        per session. Delivery may lag the append, and the hub tolerates loss in
        this live path (it detects a ``seq`` gap and re-reads with :meth:`read`),
        but never reordering within a session."""

    async def close(self) -> None:
        """Stop delivery and release connections and tasks. Idempotent."""

    async def append(self, session_id: str, type: str, body: str, final: bool) -> StoredEvent:
        """Store one event and return it with its ``seq`` and ``id``.

        ``body`` is the event's JSON without ``id``/``seq``. Atomic: the next
        ``seq`` is assigned, the event stored and the buffer trimmed as one step.
        Creates the stream (with a fresh epoch) if it does not exist. Refreshes
        the session's expiry. Raises :class:`~server.errors.SessionEnded` if the
        session's final event is already stored, and
        :class:`~server.errors.ServiceUnavailable` if the store cannot be reached.
        """

    async def read(self, session_id: str, after: StreamPosition | None) -> Replay:
        """The retained events after ``after`` (all of them when ``None``).

        If ``after`` cannot be served (trimmed, another epoch, ahead of the
        stream, or the stream does not exist) the result has ``gap=True`` and
        holds every retained event. Never skips silently.
        """

    async def info(self, session_id: str) -> SessionInfo | None:
        """The session's stream state, or ``None`` when there is none."""

    async def claim(self, session_id: str) -> bool:
        """Reserve a session for one workflow run: ``True`` for the first caller,
        across all processes; ``False`` if it was claimed or has events already.
        A claimed session counts as existing (it expires like any other)."""

    async def watch(self, session_id: str) -> None:
        """This process has a subscriber for ``session_id``: deliver its events."""

    async def unwatch(self, session_id: str) -> None:
        """This process has no subscriber left for ``session_id``."""

    async def ping(self) -> bool:
        """``True`` when the store is reachable (used by ``/readyz``)."""
