"""The broker: where a session's stored events live, and how they reach every process.

The hub is the only caller. It never knows which broker it runs on: the
in-memory one (one process) and the Redis Streams one (many processes) keep
the same promises, written on each method below, and go through the same
delivery path (:data:`EventListener`), so the hub's tests cover both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal, Protocol

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

    def still_news(self, held: list[StoredEvent], held_before_read: int) -> list[StoredEvent]:
        """Of the live events held back while this replay was read, those to pass on.

        The first ``held_before_read`` came before the read was sent: one of an epoch
        other than the stream's when read (a new epoch for lost writes, a new life), or
        of a stream then gone, is a late message from before the stream moved on, and
        is dropped. Passed on, it would send its subscriber to re-read, and find it
        again, for ever. The others may be news, of an epoch newer than the read.
        """
        epoch = None if self.info is None else self.info.epoch
        return [e for n, e in enumerate(held) if n >= held_before_read or e.epoch == epoch]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """The state of one session's stream."""

    epoch: str
    last_seq: int  # seq of the newest stored event; 0 for a claimed stream with no event
    ended: bool  # the final event has been stored; nothing more will be
    final_id: str | None  # id of the final event, when ended


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A publisher's name for one event, so that sending it again stores it once.

    ``key`` is the publisher's (unique within the session); ``fingerprint`` is a digest
    of what it asked to store, to tell a retry from a different event reusing the key.
    """

    key: str
    fingerprint: str


class Repeated(Exception):
    """An append whose :class:`IdempotencyKey` the session has stored before: nothing was
    stored now, and ``id``/``seq`` are what the first append stored."""

    def __init__(self, id: str, seq: int) -> None:
        super().__init__(id)
        self.id = id
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Lease:
    """A workflow lease: "process ``owner`` is running this session's workflow".

    It lives ``ttl`` seconds unless renewed. The process that runs a workflow
    takes the lease with its claim, renews it while the workflow runs, and
    releases it once the final event is stored. A session that was claimed
    with a lease, has no final event and no lease any more has lost the
    process running its workflow: someone must end it (``workflow_interrupted``).
    """

    owner: str  # unique per server process
    ttl: float  # seconds


LeaseState = Literal["held", "lost", "ended", "none", "gone"]
"""The state of a session's workflow lease, as :meth:`Broker.lease_states` reports it:

* ``held``: a lease exists (its workflow is running, or just ended);
* ``lost``: claimed with a lease, no final event, and the lease is gone: the process
  running the workflow died or could not renew it for ``ttl`` seconds;
* ``ended``: the final event is stored;
* ``none``: the stream exists, has not ended, and was never leased in its present
  life (events published by other services, or a stream recreated after its store lost
  it);
* ``gone``: there is no stream (never created, expired, or lost by the store).
"""


class Broker(Protocol):
    """Storage and cross-process delivery of stored events.

    Guarantees every implementation keeps:

    * per session, ``seq`` is 1, 2, 3 ... without gaps, assigned atomically with
      the append, whichever process appends;
    * at most ``buffer_size`` events are retained per session, the newest;
    * nothing is appended after an event with ``final=True``;
    * a session is forgotten (events, epoch, state) ``session_ttl`` seconds
      after its last append; a stream created again after that gets a new epoch;
    * a workflow :class:`Lease` taken with :meth:`claim` ends ``lease.ttl`` seconds
      after its last renewal, or when released; :meth:`lease_states` tells a session
      whose workflow runs from one whose workflow's process is gone.
    """

    async def start(self, on_event: EventListener) -> None:
        """Connect, and from now on pass every event stored into a watched session
        (by this or any other process) to ``on_event``, each once, in ``seq`` order
        per session. Delivery may lag the append, and the hub tolerates loss in
        this live path (it detects a ``seq`` gap and re-reads with :meth:`read`),
        but never reordering within a session."""

    async def close(self) -> None:
        """Stop delivery and release connections and tasks. Idempotent."""

    async def append(
        self,
        session_id: str,
        type: str,
        body: str,
        final: bool,
        key: IdempotencyKey | None = None,
    ) -> StoredEvent:
        """Store one event and return it with its ``seq`` and ``id``.

        ``body`` is the event's JSON without ``id``/``seq``. Atomic: the next
        ``seq`` is assigned, the event stored and the buffer trimmed as one step.
        Creates the stream (with a fresh epoch) if it does not exist. Refreshes
        the session's expiry. Raises :class:`~server.errors.SessionEnded` if the
        session's final event is already stored, and
        :class:`~server.errors.ServiceUnavailable` if the store cannot be reached.

        With a ``key`` the session has stored before (among its last ``buffer_size``
        keys, for as long as the session lives), stores nothing and raises
        :class:`Repeated`, even after the final event; with that key and another
        fingerprint, :class:`~server.errors.IdempotencyKeyReused`. The check and the
        append are one atomic step.
        """

    async def read(
        self, session_id: str, after: StreamPosition | None, limit: int | None = None
    ) -> Replay:
        """The retained events after ``after`` (all of them when ``None``), the oldest
        ``limit`` of them when given.

        If ``after`` cannot be served (trimmed, another epoch, ahead of the
        stream, or the stream does not exist) the result has ``gap=True`` and
        holds every retained event (the oldest ``limit``). Never skips silently.
        """

    async def info(self, session_id: str) -> SessionInfo | None:
        """The session's stream state, or ``None`` when there is none."""

    async def claim(self, session_id: str, lease: Lease | None = None) -> bool:
        """Reserve a session for one workflow run: ``True`` for the first caller,
        across all processes; ``False`` if it was claimed or has events already.
        A claimed session counts as existing (it expires like any other).

        With ``lease``, a successful claim takes the session's workflow lease in
        the same atomic step, so no process ever sees the session claimed but
        not leased. A claim ``lease.owner`` made and still holds the lease of,
        with nothing stored in it and not ended, may be claimed again by it: its
        answers were lost on the way back. The caller must not be running a
        workflow of the session itself."""

    async def renew_leases(self, session_ids: Collection[str], lease: Lease) -> set[str]:
        """Extend ``lease`` on each of ``session_ids`` to ``lease.ttl`` from now, in one
        pipelined call (a fixed number of round trips, whatever their number). A lease
        that expired meanwhile is taken again (the session is still running here),
        unless the session has ended or another owner holds it. Returns the sessions
        whose lease ``lease.owner`` holds now, and those whose renewal the store refused
        alone (not known to be lost). Raises :class:`~server.errors.ServiceUnavailable`
        if the store cannot be reached, or refuses every one."""

    async def release_lease(self, session_id: str, owner: str) -> None:
        """Drop ``owner``'s lease on the session (the caller has stored its final
        event first, so the session never looks ``lost``). Someone else's lease is left
        alone. Raises :class:`~server.errors.ServiceUnavailable` if the store cannot be
        reached; an unreleased lease expires by itself."""

    async def lease_states(self, session_ids: Collection[str]) -> dict[str, LeaseState]:
        """The :data:`LeaseState` of each session, each read atomically, all in one
        pipelined call; a session the store refused to read alone is left out. Raises
        :class:`~server.errors.ServiceUnavailable` if the store cannot be reached, or
        refuses every one."""

    async def watch(self, session_id: str) -> None:
        """This process has a subscriber for ``session_id``: deliver its events."""

    async def unwatch(self, session_id: str) -> None:
        """This process has no subscriber left for ``session_id``."""

    async def ping(self) -> bool:
        """``True`` when the store is reachable (used by ``/readyz``)."""
