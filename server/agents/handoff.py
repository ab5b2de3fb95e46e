"""AgentHandoffManager: call registered agents with a time-out, and stream what they do.

An agent is an async callable ``agent(context, report) -> result``. It tells
the world what it is doing by awaiting ``report(status, progress, data)``;
it never sees the hub, the broker or the session. The manager turns those
reports into ``agent_status`` events, publishes the agent's ``complete``
(with ``result.summary()``) or a sanitized ``error``, and keeps an execution
log with durations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..errors import ServiceUnavailable, SessionEnded, reference_id
from ..messages import AgentStatusEvent, CompleteEvent, ErrorEvent, StorableEvent

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """What an agent is handed to report progress from inside."""

    async def __call__(
        self, status: str, progress: int, data: Mapping[str, Any] | None = None
    ) -> None: ...


class Summarizable(Protocol):
    def summary(self) -> dict[str, Any]:
        """A small JSON-able summary for the agent's ``complete`` event."""
        ...


Agent = Callable[[Any, Reporter], Awaitable[Any]]
Publish = Callable[[StorableEvent], Awaitable[object]]
# "interrupted": the run was stopped around the agent (cancelled at shutdown, the
# session ended elsewhere, the event store refused its report), not by it.
Outcome = Literal["success", "timeout", "failed", "interrupted"]


class AgentFailed(Exception):
    """An agent timed out or raised. Its ``error`` event has already been published."""

    def __init__(self, agent: str, outcome: Outcome, reference: str) -> None:
        super().__init__(f"agent {agent!r} {outcome} (reference {reference})")
        self.agent = agent
        self.outcome = outcome
        self.reference = reference


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    agent: str
    session_id: str | None
    started_at: float  # time.time()
    duration_s: float
    outcome: Outcome


def _summarize(result: Any) -> dict[str, Any]:
    summary = getattr(result, "summary", None)
    if callable(summary):
        value = summary()
        if isinstance(value, dict):
            return value
    return {}


class AgentHandoffManager:
    """Registry of agents, and the one place agent calls are timed, reported and logged."""

    def __init__(
        self,
        publish: Publish,
        *,
        default_timeout: float = 60.0,
        on_finished: Callable[[ExecutionRecord], None] | None = None,
        log_size: int = 1000,
    ) -> None:
        self._publish = publish
        self._default_timeout = default_timeout
        self._agents: dict[str, Agent] = {}
        self._on_finished = on_finished
        self._log_size = log_size
        self.execution_log: list[ExecutionRecord] = []

    def register(self, name: str, agent: Agent) -> None:
        if name in self._agents:
            raise ValueError(f"agent {name!r} is already registered")
        self._agents[name] = agent

    @property
    def agents(self) -> tuple[str, ...]:
        return tuple(self._agents)

    def _reporter(self, name: str, session_id: str | None) -> Reporter:
        async def report(status: str, progress: int, data: Mapping[str, Any] | None = None) -> None:
            if session_id is None:
                return
            await self._publish(
                AgentStatusEvent(
                    session_id=session_id,
                    agent=name,
                    status=status,
                    progress=progress,
                    data=dict(data or {}),
                )
            )

        return report

    async def call_agent(
        self,
        name: str,
        context: Any,
        timeout: float | None = None,
        session_id: str | None = None,
    ) -> Any:
        """Run agent ``name`` on ``context`` and return its result.

        With a ``session_id``, publishes ``agent_status`` at 0, the agent's
        own reports, then ``complete`` (not final) or an ``error`` (not final).
        Raises :class:`AgentFailed` on time-out or failure, after logging the
        real exception with a reference id that the ``error`` event repeats.
        """
        agent = self._agents.get(name)
        if agent is None:
            raise KeyError(f"agent {name!r} is not registered")
        limit = self._default_timeout if timeout is None else timeout
        report = self._reporter(name, session_id)
        started_at, start = time.time(), time.perf_counter()
        # Until the agent has answered, whatever stops the call comes from around it:
        # a cancellation, the event store refusing a report.
        outcome: Outcome = "interrupted"
        try:
            await report(f"Starting {name} agent", 0)
            try:
                async with asyncio.timeout(limit):
                    result = await agent(context, report)
            except TimeoutError:
                outcome = "timeout"
                ref = reference_id()
                log.error(
                    "agent %s timed out after %.1fs [ref %s]",
                    name,
                    limit,
                    ref,
                    extra={"reference": ref},
                )
                await self._publish_error(
                    session_id,
                    name,
                    "agent_timeout",
                    f"The {name} agent took too long and was stopped.",
                    ref,
                )
                raise AgentFailed(name, outcome, ref) from None
            except AgentFailed:
                outcome = "failed"
                raise
            except (SessionEnded, ServiceUnavailable):
                # The event store's answers to the agent's own reports (the session was
                # ended elsewhere, the store cannot be reached), not a failure of the
                # agent's: the runner ends the run for them, without an agent error
                # event that could not be stored anyway.
                raise
            except Exception:
                outcome = "failed"
                ref = reference_id()
                log.exception("agent %s failed [ref %s]", name, ref, extra={"reference": ref})
                await self._publish_error(
                    session_id,
                    name,
                    "agent_failed",
                    f"The {name} agent could not finish its work.",
                    ref,
                )
                raise AgentFailed(name, outcome, ref) from None
            outcome = "success"
            if session_id is not None:
                await self._publish(
                    CompleteEvent(
                        session_id=session_id,
                        agent=name,
                        status=f"{name.capitalize()} agent finished",
                        data=_summarize(result),
                    )
                )
            return result
        finally:
            record = ExecutionRecord(
                name, session_id, started_at, time.perf_counter() - start, outcome
            )
            self.execution_log.append(record)
            del self.execution_log[: -self._log_size]
            log.info("agent %s %s in %.3fs", name, outcome, record.duration_s)
            if self._on_finished is not None:
                self._on_finished(record)

    async def _publish_error(
        self, session_id: str | None, agent: str, code: str, message: str, ref: str
    ) -> None:
        if session_id is None:
            return
        await self._publish(
            ErrorEvent(
                session_id=session_id,
                agent=agent,
                code=code,
                error=message,
                details=f"Reference {ref}",
            )
        )
