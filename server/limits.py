"""Admission control: how many streams and live sessions this process takes on.

Three limits, checked when a stream opens or a workflow starts, never later:

* ``max_connections``: open WebSocket + SSE streams in total;
* ``max_connections_per_session``: open streams of one session;
* ``max_sessions``: *live* sessions, i.e. sessions with at least one open
  stream or a running workflow in this process. A session that has ended and
  is only kept for replay is not live: it costs a bounded buffer in the broker,
  not a task or a socket. A new stream or workflow of a session that is
  already live never counts against this limit.

A refusal raises :class:`~server.errors.Overloaded` (WebSocket: ``overloaded``
then close 1013; HTTP: 503 with ``Retry-After``). What is admitted gets a
:class:`Ticket`; releasing it gives the place back. Everything here is plain
bookkeeping on the event loop: no locks, no awaits.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Literal

from .config import Settings
from .errors import Overloaded
from .metrics import Metrics

if TYPE_CHECKING:
    from prometheus_client import Gauge

Transport = Literal["websocket", "sse"]


class Ticket:
    """One admitted stream or workflow. :meth:`release` is idempotent; ``with`` releases.

    Plain fields rather than a closure: a stream holds its ticket for hours, and a
    closure with its cells costs about 300 bytes more per connection."""

    __slots__ = ("_admission", "_gauge", "_session_id")

    def __init__(self, admission: Admission, session_id: str, gauge: Gauge | None) -> None:
        self._admission: Admission | None = admission
        self._session_id = session_id
        self._gauge = gauge  # a stream's transport gauge; None for a workflow

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self._session_id, self._gauge)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """Counts open streams (it owns the ``orchestrator_connections`` gauge) and live sessions."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._max_connections = settings.max_connections
        self._max_per_session = settings.max_connections_per_session
        self._max_sessions = settings.max_sessions
        self._metrics = metrics
        self._streams: dict[str, int] = {}  # open streams per session
        self._holders: dict[str, int] = {}  # streams + running workflows per live session
        self.connections = 0

    @property
    def sessions(self) -> int:
        """Live sessions: with an open stream or a running workflow here."""
        return len(self._holders)

    def connection(self, session_id: str, transport: Transport) -> Ticket:
        """Admit one stream of ``session_id``, or raise :class:`Overloaded`."""
        if self.connections >= self._max_connections:
            raise Overloaded("connections")
        if self._streams.get(session_id, 0) >= self._max_per_session:
            raise Overloaded("session_connections")
        self._hold(session_id)
        self.connections += 1
        self._streams[session_id] = self._streams.get(session_id, 0) + 1
        gauge = self._metrics.connections.labels(transport=transport)
        gauge.inc()
        return Ticket(self, session_id, gauge)

    def workflow(self, session_id: str) -> Ticket:
        """Admit a workflow run of ``session_id``, or raise :class:`Overloaded`."""
        self._hold(session_id)
        return Ticket(self, session_id, None)

    def _release(self, session_id: str, gauge: Gauge | None) -> None:
        if gauge is not None:  # a stream
            gauge.dec()
            self.connections -= 1
            _decrement(self._streams, session_id)
        _decrement(self._holders, session_id)

    def _hold(self, session_id: str) -> None:
        held = self._holders.get(session_id, 0)
        if held == 0 and len(self._holders) >= self._max_sessions:
            raise Overloaded("sessions")
        self._holders[session_id] = held + 1


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
