"""The orchestrator workflow: its steps in order, and the runner that owns the tasks.

The stream of one run (PROTOCOL.md "Starting the workflow")::

    progress(orchestrator, 5)   "Reading your strategy"
      agent_status(extraction, 0) ... complete(extraction)
    progress(orchestrator, 25)  "Forecasting demand ..."
      agent_status(demand, 0), agent_status(demand, n) per product ... complete(demand)
    progress(orchestrator, 70)  ... inventory ... progress(85) ... pricing
    complete(orchestrator, final=True, data={"result": {...}})

or, when a step fails, that agent's ``error`` then a final ``error`` of the
orchestrator. Errors carry a reference id; the exception stays in the log.

The runner takes a workflow lease with each claim and hands every final event
to :class:`~server.leases.WorkflowLeases`, which stores it (later, if the
event store is down) and then releases the lease; its
:class:`~server.leases.LeaseMonitor` ends the sessions followed here whose
workflow's process died (see :mod:`server.leases`).

A client cancels a workflow (:meth:`WorkflowRunner.cancel`) by storing its final
event, ``workflow_cancelled``, from whichever process it asked: the stream ends at
once, everywhere, and nothing the workflow publishes later is stored. The work
itself stops at once when it runs in that process, else at its process's next
lease renewal (which finds the session ended) or its next event, whichever comes
first. A session ended by anyone else (a service's final event, another process
that took this one for dead) stops its work the same way.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

from .agents.demand import DemandForecast
from .agents.extraction import ExtractionResult
from .agents.handoff import AgentFailed, AgentHandoffManager
from .agents.inventory import InventoryPlan, InventoryRequest
from .agents.pricing import PricingPlan, PricingRequest
from .errors import Conflict, ServiceUnavailable, SessionEnded, SessionNotFound, reference_id
from .hub import Hub
from .leases import WORKFLOW_INTERRUPTED, LeaseMonitor, WorkflowLeases, interrupted_message
from .logs import SESSION_ID
from .messages import (
    ORCHESTRATOR,
    CompleteEvent,
    ProgressEvent,
    StorableEvent,
    StreamPosition,
    result_of,
    workflow_end,
)
from .metrics import Metrics

log = logging.getLogger(__name__)

WORKFLOW_CANCELLED = "workflow_cancelled"
CANCELLED_MESSAGE = "The forecast was cancelled."


# How long a run stopped by another final event may spend reading it from the store.
FINAL_READ_TIMEOUT = 2.0


def _shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The server is shutting down; please start the forecast again in a moment.",
        code="shutting_down",
    )


SHUTDOWN = "the server is restarting"  # why a run interrupted by shutdown ended


def _shutdown_end(session_id: str) -> StorableEvent:
    return workflow_end(session_id, WORKFLOW_INTERRUPTED, interrupted_message(SHUTDOWN))


def _session_ended() -> Conflict:
    return Conflict("This session has already ended.", code="session_ended")


def session_exists() -> Conflict:
    return Conflict(
        "This session already has a workflow. Start a new session to run another.",
        code="session_exists",
    )


@dataclass(frozen=True, slots=True)
class WorkflowOutcome:
    status: Literal["complete", "failed"]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class WorkflowRunner:
    """Runs at most one workflow per session, ever, across every process sharing the broker.

    ``lease_ttl``: how long a workflow's lease outlives its last renewal (how soon
    another process notices that this one died); ``lease_check_interval``: how often
    :attr:`monitor` looks for such sessions once started; ``retry_finals_for``: how
    long a final event is retried while the event store is down.
    """

    def __init__(
        self,
        hub: Hub,
        handoff: AgentHandoffManager,
        metrics: Metrics,
        *,
        lease_ttl: float = 10.0,
        lease_check_interval: float = 2.0,
        retry_finals_for: float = 600.0,
    ) -> None:
        self._hub = hub
        self._handoff = handoff
        self._metrics = metrics
        self._tasks: dict[str, asyncio.Task[WorkflowOutcome]] = {}
        self._claiming: set[str] = set()  # claims on their way to the broker
        self._working: set[str] = set()  # runs in their steps: what _stop may cancel
        self._finishing: set[str] = set()  # runs past their steps, storing their final event
        self._stopped: set[str] = set()  # runs _stop cancelled: their session has ended
        self._ends: dict[str, dict[str, Any]] = {}  # final events stored here (ended())
        self._closing = False
        self._interrupting = False  # shutdown's grace is over: runs are being interrupted
        self.leases = WorkflowLeases(
            hub, lease_ttl, retry_finals_for=retry_finals_for, on_ended_elsewhere=self._stop
        )
        self.monitor = LeaseMonitor(hub, self.leases, lease_check_interval)

    async def start(self, session_id: str, strategy: str) -> asyncio.Task[WorkflowOutcome]:
        """Claim the session and start its workflow; ``Conflict`` if it already ran,
        ``ServiceUnavailable`` (``shutting_down``) once :meth:`close` has begun."""
        if self._closing:
            raise _shutting_down()
        # Asked here first, since the claim lets this process take back a claim of its own
        # that nothing acted on (the broker's claim): never one it is still acting on
        # (running, being claimed, or owing its final event).
        acting = session_id in self._tasks or session_id in self._claiming
        if acting or self.leases.holds(session_id):
            raise session_exists()
        self._claiming.add(session_id)
        try:
            claimed = await self._hub.broker.claim(session_id, self.leases.lease)
        finally:
            self._claiming.discard(session_id)
        if not claimed:
            raise session_exists()
        self.leases.hold(session_id)
        if self._closing:
            # Shutdown began while the claim was on its way, and close() does not know of
            # this run: end the session now, so that its subscribers are not left waiting.
            try:
                stored = await self.leases.finish(session_id, _shutdown_end(session_id))
            except SessionEnded:
                stored = True
            if not stored and self.leases.closed:
                # Nothing retries it any more: the lease lapses, and other processes'
                # monitors end the session.
                log.warning("gave up ending session %s: the event store is unavailable", session_id)
                self.leases.drop(session_id)
            raise ServiceUnavailable(
                "The server shut down as the forecast was starting; it did not run. Please "
                "start it again, with a new session id.",
                code="shutting_down",
            )
        task = asyncio.create_task(self._run(session_id, strategy), name=f"workflow-{session_id}")
        self._tasks[session_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(session_id, None))
        return task

    @property
    def running(self) -> int:
        return len(self._tasks)

    @property
    def closing(self) -> bool:
        """Shutdown has begun: no workflow starts any more."""
        return self._closing

    async def cancel(self, session_id: str) -> None:
        """End the session's workflow at its client's request: store its final event,
        ``workflow_cancelled``, and stop its work (at once if it runs here; see the
        module docstring). Cancelling a cancelled workflow again is done already.

        ``SessionNotFound`` without a session; ``Conflict`` when the session never had
        a workflow (``no_workflow``) or ended otherwise (``session_ended``);
        ``ServiceUnavailable`` when the event store cannot say or store it."""
        state = (await self._hub.broker.lease_states([session_id])).get(session_id)
        if state is None:  # the store refused to read this session alone
            raise ServiceUnavailable("The event store could not read this session.")
        if state in ("gone", "none") and session_id in self._tasks:
            # Running here, in a session the store lost (restarted empty, say): the next
            # renewal takes its lease again, and a cancel meanwhile is still a cancel.
            state = "held"
        if state == "gone":
            raise SessionNotFound()
        if state == "none":
            raise Conflict(
                "This session has no workflow to cancel: its events come from other services.",
                code="no_workflow",
            )
        if state != "ended":  # running ("held"), or its process is gone ("lost")
            if session_id in self._finishing or self.leases.owes(session_id):
                # Its run here is past its steps: it ended, and is storing its final event
                # (or waits for the store to take it). That is the session's end.
                raise _session_ended()
            event = workflow_end(session_id, WORKFLOW_CANCELLED, CANCELLED_MESSAGE)
            try:
                await self._hub.publish(event)
            except SessionEnded:
                pass  # it ended meanwhile: as below
            else:
                self.ended(event)
                return
        final = await self._final_event(session_id)
        if final is None or final.get("code") != WORKFLOW_CANCELLED:
            raise _session_ended()

    def ended(self, final: StorableEvent) -> None:
        """``final``, stored through this process (a cancel, a service's final event), has
        ended its session: if the session's workflow runs here, stop its work now, and let
        the run end as ``final`` says without reading it back."""
        if final.session_id in self._tasks:
            self._ends[final.session_id] = final.model_dump(mode="json")
        self._stop(final.session_id)

    def _stop(self, session_id: str) -> None:
        """The session ended while its workflow runs here: stop the work. The run then
        ends as the session's final event says (:meth:`_ended_elsewhere`)."""
        if session_id in self._working:
            self._working.discard(session_id)  # at most once
            self._stopped.add(session_id)
            self._tasks[session_id].cancel()

    async def _final_event(self, session_id: str) -> dict[str, Any] | None:
        """The session's final event as stored, or ``None`` when it has none (or it was
        trimmed)."""
        info = await self._hub.broker.info(session_id)
        position = (
            None if info is None or info.final_id is None else StreamPosition.parse(info.final_id)
        )
        if position is None:
            return None
        before = StreamPosition(position.epoch, position.seq - 1) if position.seq > 1 else None
        replay = await self._hub.broker.read(session_id, before, 1)
        if replay.gap or not replay.events or not replay.events[0].final:
            return None
        return replay.events[0].to_dict()

    async def close(self, grace: float = 0.0) -> None:
        """Give running workflows ``grace`` seconds, then interrupt them (each ends with a
        final ``workflow_interrupted`` error so its subscribers stop waiting). No new
        workflow starts from now on."""
        self._closing = True
        tasks = dict(self._tasks)
        if tasks:
            if grace > 0:
                await asyncio.wait(tasks.values(), timeout=grace)
            self._interrupting = True
            # A run created in this very loop turn has not entered _run yet: cancelled
            # now, it would end without a final event. One turn lets each enter it.
            await asyncio.sleep(0)
            for session_id, task in tasks.items():
                # A run past its steps is storing its final event (bounded by the broker's
                # retries): cancelled, it would end with none, and a `?wait=true` unanswered.
                if session_id not in self._finishing:
                    task.cancel()
            await asyncio.wait(tasks.values())
        await self.monitor.close()
        await self.leases.close()

    async def _run(self, session_id: str, strategy: str) -> WorkflowOutcome:
        SESSION_ID.set(session_id)  # this task's own context: its log lines name the session
        self._working.add(session_id)
        try:
            try:
                result = await self._steps(session_id, strategy)
            finally:
                # What follows stores the run's final event: never cancelled by _stop,
                # and let finish by close().
                self._working.discard(session_id)
                self._finishing.add(session_id)
        except asyncio.CancelledError:
            if session_id in self._stopped:
                # _stop's own cancellation, handled here: the task goes on, not cancelled.
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                return await self._ended_elsewhere(session_id)
            # Otherwise close() cancelled the run (shutdown). Its subscribers get a final
            # event, and the run ends with that outcome rather than as cancelled, so a
            # `?wait=true` request still waiting on it is answered instead of dropped.
            return await self._interrupt(
                session_id, "interrupted: the server is shutting down", SHUTDOWN
            )
        except ServiceUnavailable:
            # The event store could not be reached, even after the broker's retries.
            return await self._interrupt(
                session_id,
                "stopped: the event store is unavailable",
                "the event store was unavailable",
            )
        except SessionEnded:
            # One of its events found the session ended (cancelled, or ended by another
            # process or a service) before _stop did.
            return await self._ended_elsewhere(session_id)
        except AgentFailed as failure:
            return await self._fail(
                session_id,
                "workflow_failed",
                f"The forecast could not be completed: the {failure.agent} agent failed.",
                failure.reference,
                "failed",
            )
        except Exception:
            ref = reference_id()
            log.exception(
                "workflow of session %s failed [ref %s]", session_id, ref, extra={"reference": ref}
            )
            return await self._fail(
                session_id, "internal_error", "Something went wrong on our side.", ref, "failed"
            )
        else:
            event = CompleteEvent(
                session_id=session_id,
                agent=ORCHESTRATOR,
                status="Forecast ready",
                data={"result": result},
                final=True,
            )
            return await self._end(event, WorkflowOutcome("complete", result=result), "complete")
        finally:
            self._finishing.discard(session_id)
            self._stopped.discard(session_id)
            self._ends.pop(session_id, None)

    async def _end(
        self, event: StorableEvent, outcome: WorkflowOutcome, label: str
    ) -> WorkflowOutcome:
        """Store the run's final event (or owe it, if the event store is down: see
        :meth:`WorkflowLeases.finish`) and count the run as ``label``; if the session
        has ended already (a cancel came first), the run ends as that says."""
        session_id = event.session_id
        try:
            stored = await self.leases.finish(session_id, event)
        except SessionEnded:
            return await self._ended_elsewhere(session_id)
        if not stored and session_id in self._ends:
            # A final event stored here (a cancel, say) came while this one was on its
            # way, and the store refused this one: the session has ended as that says.
            # Nothing to owe.
            return await self._ended_elsewhere(session_id)
        self._metrics.workflows.labels(outcome=label).inc()
        return outcome

    async def _ended_elsewhere(self, session_id: str) -> WorkflowOutcome:
        """The run of a session whose final event someone else stored: cancelled by its
        client, ended by a service, or by another process (this one could not renew its
        lease for ``lease_ttl`` and was taken for dead). Subscribers have that event; the
        run's outcome says what it said: known if it was stored here, else read
        (briefly, and not once shutdown interrupts runs: the run is answered either way)."""
        self.leases.drop(session_id)  # the session has ended: its lease no longer counts
        final = self._ends.get(session_id)
        if final is None and not self._interrupting:
            try:
                async with asyncio.timeout(FINAL_READ_TIMEOUT):
                    final = await self._final_event(session_id)
            except (ServiceUnavailable, TimeoutError):
                pass
        if final is not None and final["type"] == "complete":
            # Stored by a service: its result, when it has one the outcome can hold.
            outcome = WorkflowOutcome("complete", result=result_of(final))
        elif final is not None and final["type"] == "error":
            error = {"code": final["code"], "error": final["error"]}
            outcome = WorkflowOutcome("failed", error=error)
        else:
            error = {"code": WORKFLOW_INTERRUPTED, "error": "The session was ended elsewhere."}
            outcome = WorkflowOutcome("failed", error=error)
        code = None if outcome.error is None else outcome.error["code"]
        if code == WORKFLOW_CANCELLED:
            log.info("workflow of session %s stopped: it was cancelled", session_id)
            self._metrics.workflows.labels(outcome="cancelled").inc()
        else:
            log.warning(
                "workflow of session %s stopped: the session was ended elsewhere (%s)",
                session_id,
                code or "complete",
            )
            self._metrics.workflows.labels(outcome="interrupted").inc()
        return outcome

    async def _interrupt(self, session_id: str, what: str, because: str) -> WorkflowOutcome:
        """End a run with ``workflow_interrupted``: a warning naming the reference that its
        final error event shows, then that event, counted as interrupted."""
        ref = reference_id()
        log.warning(
            "workflow of session %s %s [ref %s]", session_id, what, ref, extra={"reference": ref}
        )
        return await self._fail(
            session_id,
            WORKFLOW_INTERRUPTED,
            interrupted_message(because),
            ref,
            "interrupted",
        )

    async def _fail(
        self, session_id: str, code: str, message: str, ref: str, label: str
    ) -> WorkflowOutcome:
        """End a run with the final ``error`` ``code``, counted as ``label``."""
        event = workflow_end(session_id, code, message, f"Reference {ref}")
        error = {"code": code, "error": message, "reference": ref}
        return await self._end(event, WorkflowOutcome("failed", error=error), label)

    async def _progress(self, session_id: str, status: str, progress: int) -> None:
        await self._hub.publish(
            ProgressEvent(
                session_id=session_id, agent=ORCHESTRATOR, status=status, progress=progress
            )
        )

    async def _steps(self, session_id: str, strategy: str) -> dict[str, Any]:
        call = self._handoff.call_agent

        await self._progress(session_id, "Reading your strategy", 5)
        extraction: ExtractionResult = await call("extraction", strategy, session_id=session_id)
        parameters = extraction.parameters

        await self._progress(session_id, "Forecasting demand", 25)
        forecast: DemandForecast = await call("demand", parameters, session_id=session_id)

        await self._progress(session_id, "Planning inventory", 70)
        inventory: InventoryPlan = await call(
            "inventory",
            InventoryRequest(parameters=parameters, forecast=forecast),
            session_id=session_id,
        )

        await self._progress(session_id, "Recommending prices", 85)
        pricing: PricingPlan = await call(
            "pricing",
            PricingRequest(parameters=parameters, forecast=forecast),
            session_id=session_id,
        )
        await self._progress(session_id, "Putting the result together", 95)
        result: dict[str, Any] = {
            "strategy": strategy,
            "parameters": parameters.model_dump(mode="json"),
            "extraction_method": extraction.method,
        }
        if extraction.fallback_reason:
            # Why the rules read the strategy: a frontend showing the result can say so.
            result["fallback_reason"] = extraction.fallback_reason
        result["forecast"] = forecast.model_dump(mode="json")
        result["inventory"] = inventory.model_dump(mode="json")
        result["pricing"] = pricing.model_dump(mode="json")
        return result


async def wait_outcome(task: asyncio.Task[WorkflowOutcome]) -> WorkflowOutcome:
    """Await a run without letting the caller's cancellation (a client that hung up) stop it."""
    return await asyncio.shield(task)
