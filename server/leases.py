"""Workflow leases: subscribers never wait forever for a workflow whose process died.

With several server processes, a client may follow a session on process B while
its workflow runs on process A. If A dies (SIGKILL, OOM, a lost machine), nobody
would ever store the session's final event, and B's subscribers would wait
forever. So:

* **The lease.** A's claim of the session also takes a lease in the broker
  (:class:`~server.brokers.base.Lease`: "A runs this workflow", with a
  time-to-live). :class:`WorkflowLeases` keeps the leases of every workflow
  running in this process alive with ONE task, one pipelined broker call per tick
  (every ``ttl / 3``) for all of them, and releases a lease only after that
  workflow's final event is stored, so a session that ended normally never looks
  abandoned.
* **The monitor.** :class:`LeaseMonitor` (ONE task per process) looks, every
  ``check_interval``, at the sessions this process has subscribers on. A session
  whose lease is ``lost`` (claimed with a lease, not ended, lease gone) gets the
  final ``error`` event ``workflow_interrupted`` from whichever process notices
  first; the others' appends then fail with ``SessionEnded``, which they ignore.
  So subscribers everywhere get their last event within about
  ``ttl + check_interval`` of the death. A session found with no workflow, or
  ended, is looked at only every :data:`QUIET_ROUNDS` rounds (next paragraph).
* **Quiet sessions.** A session whose state says it never had a workflow
  (``none``: other services publish into it) or that has ended stays so: a claim
  only succeeds on a session the store does not have (or, for the process that
  claimed it, on its own claim with nothing in it: see the broker's ``claim``). It
  can only change if the
  store loses the session (it expired, or Redis restarted empty) and a workflow
  then claims its id again. So the monitor asks about such sessions every
  :data:`QUIET_ROUNDS` rounds instead of every round: a process streaming 1,000
  sessions that only services publish into runs 1,000 lease scripts on Redis
  every 20 s instead of every 2 s (each round held Redis for about 4.4 ms and
  this process for 3.8 ms, and the events that came meanwhile waited). The price
  is in the rare case only: a workflow that claims a lost session's id and
  dies may be noticed up to ``QUIET_ROUNDS * check_interval`` later.
* **A store that forgot.** If the session's stream disappears altogether under
  a running workflow (Redis restarted empty), there is nothing left to call
  ``lost``. A monitor that saw the lease held remembers it; if, two ``ttl`` later,
  no process has taken the lease again (a live owner does so at its next
  renewal, within ``ttl / 3`` plus the broker's retry back-off), it ends the
  session the same way, in a new epoch (subscribers get ``replay_gap``, then the
  error). Two lifetimes, not one: ending a live workflow by mistake costs more
  than noticing a dead one a little later.
* **A final event that cannot be stored** (the store is down when a workflow
  ends): the runner does not drop it. :class:`WorkflowLeases` keeps it and keeps
  the lease, and retries it on each tick until it is stored (for at most
  ``retry_finals_for`` seconds), so subscribers get it once the store is back. If
  this process dies meanwhile, its lease lapses and the monitors take over. If,
  once the store is back, the renewal finds the session ended or its lease another
  process's (the store lost the session, and another workflow claimed its id), the
  event is dropped: it is not this process's to store any more.

With the in-memory broker all of this runs too, trivially: there is one process,
and a lease is never lost while it lives (see :mod:`server.brokers.memory`).

A renewal that finds the session of a workflow running here ended (cancelled
through another process, ended by a service's final event, or by another process
that took this one for dead, which could not reach the store for longer than
``ttl``) or another process's calls ``on_ended_elsewhere``, which stops that
workflow's work; so does the workflow's next event (``SessionEnded``), whichever
comes first. Its subscribers have already had the final event.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from .brokers.base import Lease
from .errors import ServiceUnavailable, SessionEnded
from .hub import Hub
from .messages import StorableEvent, StoredEvent, workflow_end

log = logging.getLogger(__name__)

WORKFLOW_INTERRUPTED = "workflow_interrupted"
# Every how many rounds the monitor asks about a quiet session (module docstring).
QUIET_ROUNDS = 10
_QUIET_STATES = frozenset({"none", "ended"})


def interrupted_message(because: str) -> str:
    """What a ``workflow_interrupted`` final error tells the user."""
    return f"The forecast was interrupted because {because}. Please run it again."


PROCESS_GONE_MESSAGE = interrupted_message("the server running it stopped")

Publish = Callable[[StorableEvent], Awaitable[StoredEvent]]


def new_owner() -> str:
    """A lease owner id, unique to this process (random: pids repeat across machines)."""
    return secrets.token_hex(8)


class WorkflowLeases:
    """The leases of the workflows this process runs, and the final events it still owes.

    ``hold`` after a successful claim (taken with :attr:`lease`); ``finish`` with the
    workflow's final event. One task renews every held lease each ``ttl / 3``
    seconds and retries the final events that could not be stored yet. A renewal
    that finds a running workflow's session ended, or another process's, calls
    ``on_ended_elsewhere`` with it, so that its work stops.
    """

    def __init__(
        self,
        hub: Hub,
        ttl: float,
        *,
        retry_finals_for: float = 600.0,
        owner: str | None = None,
        on_ended_elsewhere: Callable[[str], None] | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("the lease ttl must be positive")
        self.lease = Lease(owner or new_owner(), ttl)
        self.interval = ttl / 3
        self._hub = hub
        self._retry_finals_for = retry_finals_for
        self._held: set[str] = set()
        self._owed: dict[str, tuple[StorableEvent, float]] = {}  # session -> (event, deadline)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._on_ended_elsewhere = on_ended_elsewhere

    def hold(self, session_id: str) -> None:
        """This process runs the session's workflow (its claim took :attr:`lease`)."""
        self._held.add(session_id)
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._keep_forever(), name="workflow-leases")

    def holds(self, session_id: str) -> bool:
        """The session's workflow runs here, or its final event is still owed from here."""
        return session_id in self._held

    @property
    def owed(self) -> int:
        """Final events not stored yet."""
        return len(self._owed)

    async def finish(self, session_id: str, event: StorableEvent) -> bool:
        """Store the workflow's final event, then release the lease; ``True`` once stored.

        If the store cannot be reached the event is owed (``False``): the lease is kept
        and the event retried on every tick. If the session has ended already (another
        final event came first: a cancel, a service's, another process that took this
        one for dead), ``SessionEnded`` is raised: the stored final event, not this one,
        says how the workflow ended. Its lease is dropped, not released: an ended
        session's lease counts for nothing, and lapses (no call to a store that may be
        slow, during a shutdown say).
        """
        try:
            await self._hub.publish(event)
        except ServiceUnavailable:
            log.warning(
                "the final event of %s could not be stored; retrying while the store is "
                "unavailable",
                session_id,
            )
            self._owed[session_id] = (event, time.monotonic() + self._retry_finals_for)
            return False
        except SessionEnded:
            self.drop(session_id)  # the session has ended: its lease no longer counts
            raise
        await self._release(session_id)
        return True

    @property
    def closed(self) -> bool:
        """:meth:`close` has run: owed final events are no longer retried."""
        return self._closed

    def owes(self, session_id: str) -> bool:
        """The session's workflow has ended here; its final event waits for the store."""
        return session_id in self._owed

    def drop(self, session_id: str) -> None:
        """Forget the session without releasing anything (it ended elsewhere)."""
        self._held.discard(session_id)
        self._owed.pop(session_id, None)

    async def close(self) -> None:
        """Stop renewing. Leases still held lapse after their ttl, so that the monitors
        of other processes end those sessions; owed final events are given up."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # never swallows close()'s own cancellation
        if self._owed:
            log.warning("%d final event(s) could not be stored before shutdown", len(self._owed))
            self._owed.clear()

    async def _release(self, session_id: str) -> None:
        self._held.discard(session_id)
        self._owed.pop(session_id, None)
        try:
            await self._hub.broker.release_lease(session_id, self.lease.owner)
        except ServiceUnavailable:
            pass  # it lapses by itself after its ttl; the final event is stored already

    async def _keep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            # Counted from this tick's start: the time a tick takes (a slow store, a busy
            # event loop) is not added to the time between two renewals.
            next_at = loop.time() + self.interval
            try:
                await self.tick()
            except Exception:  # a bug here must not stop every renewal for good
                log.exception("lease renewal failed")

    async def tick(self) -> None:
        """Renew every held lease (one pipelined call), then retry the owed final events."""
        if not self._held:
            return
        asked = frozenset(self._held)  # held may grow while the renewal is on its way
        try:
            held = await self._hub.broker.renew_leases(sorted(asked), self.lease)
        except ServiceUnavailable:
            log.debug("could not renew %d workflow lease(s)", len(asked))
            return  # the store is down: owed events would fail too
        if self._on_ended_elsewhere is not None:
            for session_id in asked - held:
                if session_id in self._held and session_id not in self._owed:
                    # Still running here, but the session has ended (cancelled, or taken
                    # for dead) or is another process's now: its work is for nothing.
                    self._on_ended_elsewhere(session_id)
        now = time.monotonic()
        for session_id, (event, deadline) in list(self._owed.items()):
            if session_id not in asked:
                continue  # owed since the renewal was sent: asked about at the next tick
            if session_id not in held:
                # Ended elsewhere, or the store lost the session and another workflow
                # claimed its id: this final event is not ours to store any more.
                log.warning("session %s was ended or claimed elsewhere", session_id)
                self.drop(session_id)
                continue
            if now > deadline:
                log.error("gave up storing the final event of %s", session_id)
                self.drop(session_id)  # its lease lapses; other monitors end the session
                continue
            try:
                await self._hub.publish(event)
            except ServiceUnavailable:
                self._owed[session_id] = self._owed.pop(session_id)  # next tick, last
                if not await self._hub.broker.ping():
                    return  # down again: the others would fail too
                continue  # refused for this session alone: it holds back no other
            except SessionEnded:
                log.warning("session %s was ended elsewhere (its lease was lost)", session_id)
            else:
                log.info("stored the owed final event of %s", session_id)
            await self._release(session_id)


class LeaseMonitor:
    """Ends the sessions, followed here, whose workflow's process is gone (see the module
    docstring). One task per process; :meth:`check` is one round."""

    def __init__(self, hub: Hub, leases: WorkflowLeases, check_interval: float) -> None:
        if check_interval <= 0:
            raise ValueError("the lease check interval must be positive")
        self._hub = hub
        self._leases = leases
        self._interval = check_interval
        self._grace = 2 * leases.lease.ttl  # for a session the store lost (module docstring)
        self._seen_held: set[str] = set()  # sessions seen with a lease (a running workflow)
        self._missing_since: dict[str, float] = {}  # seen held, then no lease and no owner
        self._quiet: set[str] = set()  # found with no workflow, or ended (module docstring)
        self._rounds = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._check_forever(), name="lease-monitor")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # never swallows close()'s own cancellation

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:  # a bug here must not end the monitoring for good
                log.exception("lease check failed")

    async def check(self) -> list[str]:
        """One round: end every followed session whose workflow lost its process;
        returns those it ended."""
        sessions = self._hub.sessions
        followed = set(sessions)
        self._seen_held &= followed
        self._quiet &= followed
        for session_id in list(self._missing_since):
            if session_id not in followed:
                del self._missing_since[session_id]
        self._rounds += 1
        if self._rounds % QUIET_ROUNDS:
            sessions = [s for s in sessions if s not in self._quiet]
        if not sessions:
            return []
        try:
            states = await self._hub.broker.lease_states(sessions)
        except ServiceUnavailable:
            return []  # the store is down: nothing can be ended now anyway
        now = time.monotonic()
        ended = []
        for session_id, state in states.items():
            if state in _QUIET_STATES and session_id not in self._seen_held:
                self._quiet.add(session_id)
            else:
                self._quiet.discard(session_id)
            if state == "held":
                self._seen_held.add(session_id)
                self._missing_since.pop(session_id, None)
                continue
            if state == "ended":
                self._seen_held.discard(session_id)
                self._missing_since.pop(session_id, None)
                continue
            if self._leases.holds(session_id):
                continue  # its workflow runs in this very process, which is alive
            if state == "lost":
                abandoned = True
            elif session_id in self._seen_held:  # "gone" or "none" after "held"
                since = self._missing_since.setdefault(session_id, now)
                abandoned = now - since >= self._grace
            else:
                abandoned = False  # no workflow known: nobody owes this session an end
            if abandoned and await self._interrupt(session_id):
                ended.append(session_id)
        return ended

    async def _interrupt(self, session_id: str) -> bool:
        event = workflow_end(session_id, WORKFLOW_INTERRUPTED, PROCESS_GONE_MESSAGE)
        try:
            await self._hub.publish(event)
        except ServiceUnavailable:
            return False  # the store is down again: next round
        except SessionEnded:
            stored = False  # another process ended it first
        else:
            stored = True
            log.warning("ended session %s: the process running its workflow is gone", session_id)
        self._seen_held.discard(session_id)
        self._missing_since.pop(session_id, None)
        return stored
