"""The workflow runner and the agent handoff: the event story of a run, failures and
time-outs that end in sanitized errors, and sessions that never disturb each other."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from aiohttp import WSMsgType

from server.agents import register_agents
from server.agents.handoff import AgentFailed, AgentHandoffManager, Reporter
from server.brokers.memory import MemoryBroker
from server.context import STREAM_CONTEXT
from server.errors import Conflict, ServiceUnavailable, SessionEnded
from server.hub import Hub
from server.messages import ProgressEvent, StoredEvent, workflow_end
from server.metrics import Metrics
from server.workflow import FINAL_READ_TIMEOUT, WorkflowRunner
from tests.clients import AppClient, app_of
from tests.timing import EVENT_TIMEOUT, WORKFLOW_TIMEOUT

STRATEGY = "15% off outdoor furniture for 8 weeks"
SECRET = "sk-live-0123456789abcdef"


class Rig:
    """A hub, a handoff manager with the real agents, and a runner: no HTTP."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.hub = Hub(MemoryBroker(500, 60.0), queue_size=500, metrics=self.metrics)
        self.handoff = AgentHandoffManager(self.hub.publish, default_timeout=30.0)
        self.runner = WorkflowRunner(self.hub, self.handoff, self.metrics)

    async def events(self, session_id: str) -> list[dict[str, Any]]:
        replay = await self.hub.broker.read(session_id, None)
        return [event.to_dict() for event in replay.events]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    await rig.hub.start()
    resources = register_agents(rig.handoff, None, forecast_workers=1)
    yield rig
    await rig.runner.close()
    await rig.hub.close()
    await resources.close()


def replace_agent(rig: Rig, name: str, agent: Any) -> None:
    rig.handoff._agents[name] = agent  # the registry has no "replace": tests only


async def test_a_run_streams_each_agent_and_ends_with_the_final_result(rig: Rig) -> None:
    """Orchestrator progress rises; each agent: agent_status 0, its reports, complete; then
    the orchestrator's final complete with the whole result."""
    task = await rig.runner.start("workflow-0001", STRATEGY)
    outcome = await asyncio.wait_for(task, WORKFLOW_TIMEOUT)
    assert outcome.status == "complete"
    events = await rig.events("workflow-0001")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    overall = [e["progress"] for e in events if e["agent"] == "orchestrator"]
    assert overall == sorted(overall) and overall[-1] == 100

    for agent in ("extraction", "demand", "inventory", "pricing"):
        mine = [e for e in events if e.get("agent") == agent]
        assert mine[0]["type"] == "agent_status" and mine[0]["progress"] == 0
        assert mine[-1]["type"] == "complete" and mine[-1]["final"] is False
        assert all(e["type"] == "agent_status" for e in mine[1:-1])
    demand_reports = [e["status"] for e in events if e.get("agent") == "demand"][1:-1]
    assert any("units over 8 weeks" in status for status in demand_reports)

    last = events[-1]
    assert last["type"] == "complete" and last["agent"] == "orchestrator" and last["final"]
    result = last["data"]["result"]
    assert set(result) >= {"parameters", "forecast", "inventory", "pricing"}
    assert result["parameters"]["horizon_weeks"] == 8
    # No language model is configured here: the result says the rules read the strategy, and why.
    assert (result["extraction_method"], result["fallback_reason"]) == ("rules", "not configured")
    assert result == outcome.result

    log = rig.handoff.execution_log
    assert [r.agent for r in log] == ["extraction", "demand", "inventory", "pricing"]
    assert all(r.outcome == "success" and r.duration_s >= 0 for r in log)


async def test_a_failing_agent_fails_its_workflow_with_sanitized_errors(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent that raises: its error event, then a final workflow error; the exception
    text (here a secret) is only in the log, next to the same reference id."""

    async def leaky_demand(params: Any, report: Reporter) -> Any:
        await report("Fitting", 10)
        raise RuntimeError(f"connection to db failed, password={SECRET}")

    replace_agent(rig, "demand", leaky_demand)
    with caplog.at_level(logging.ERROR):
        outcome = await asyncio.wait_for(
            await rig.runner.start("workflow-0002", STRATEGY), WORKFLOW_TIMEOUT
        )
    assert outcome.status == "failed"
    events = await rig.events("workflow-0002")
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["agent"], e["code"], e["final"]) for e in errors] == [
        ("demand", "agent_failed", False),
        ("orchestrator", "workflow_failed", True),
    ]
    assert events[-1] == errors[-1]
    wire = json.dumps(events) + json.dumps(outcome.error)
    assert SECRET not in wire and "RuntimeError" not in wire and "Traceback" not in wire
    reference = errors[0]["details"].removeprefix("Reference ")
    assert errors[1]["details"] == f"Reference {reference}"
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged and logged[0].exc_info is not None and SECRET in str(logged[0].exc_info[1])


async def test_an_agent_time_out_is_an_error_event_and_fails_the_workflow(rig: Rig) -> None:
    """An agent over its time-out is stopped: agent_timeout, then a final workflow error."""
    stuck = asyncio.Event()

    async def stuck_extraction(strategy: str, report: Reporter) -> Any:
        await stuck.wait()  # never set: only the time-out ends this

    replace_agent(rig, "extraction", stuck_extraction)
    rig.handoff._default_timeout = 0.2
    outcome = await asyncio.wait_for(
        await rig.runner.start("workflow-0003", "10% off garden tools for 2 weeks"),
        WORKFLOW_TIMEOUT,
    )
    assert outcome.status == "failed"
    errors = [e for e in await rig.events("workflow-0003") if e["type"] == "error"]
    assert [(e["agent"], e["code"]) for e in errors] == [
        ("extraction", "agent_timeout"),
        ("orchestrator", "workflow_failed"),
    ]
    assert rig.handoff.execution_log[-1].outcome == "timeout"


async def test_a_failing_workflow_does_not_disturb_another_session(rig: Rig) -> None:
    """One session's agent failure leaves a concurrent session's run complete and clean."""
    real_inventory = rig.handoff._agents["inventory"]

    async def inventory_failing_for_one(request: Any, report: Reporter) -> Any:
        if request.parameters.horizon_weeks == 3:
            raise ValueError("boom")
        return await real_inventory(request, report)

    replace_agent(rig, "inventory", inventory_failing_for_one)
    bad = await rig.runner.start("workflow-bad1", "outdoor furniture for 3 weeks")
    good = await rig.runner.start("workflow-good", STRATEGY)
    bad_outcome, good_outcome = await asyncio.wait_for(asyncio.gather(bad, good), WORKFLOW_TIMEOUT)
    assert (bad_outcome.status, good_outcome.status) == ("failed", "complete")
    good_events = await rig.events("workflow-good")
    assert all(e["session_id"] == "workflow-good" for e in good_events)
    assert not any(e["type"] == "error" for e in good_events)


async def test_a_session_runs_at_most_one_workflow(rig: Rig) -> None:
    """Starting a second workflow on a session is a conflict."""
    task = await rig.runner.start("workflow-0004", STRATEGY)
    with pytest.raises(Conflict):
        await rig.runner.start("workflow-0004", STRATEGY)
    await asyncio.wait_for(task, WORKFLOW_TIMEOUT)


async def test_closing_the_runner_interrupts_running_workflows_with_a_final_error(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown: a workflow still running ends with a final workflow_interrupted error,
    whose reference leads to a log line."""
    started = asyncio.Event()

    async def slow_demand(params: Any, report: Reporter) -> Any:
        started.set()
        await asyncio.Event().wait()

    replace_agent(rig, "demand", slow_demand)
    task = await rig.runner.start("workflow-0005", STRATEGY)
    await asyncio.wait_for(started.wait(), EVENT_TIMEOUT)
    with caplog.at_level(logging.WARNING):
        await rig.runner.close(grace=0.0)
    # The run ends with that outcome, not as cancelled: a `?wait=true` caller gets it.
    outcome = task.result()
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error["code"] == "workflow_interrupted"
    last = (await rig.events("workflow-0005"))[-1]
    assert (last["type"], last["code"], last["final"]) == ("error", "workflow_interrupted", True)
    assert outcome.error["reference"] == last["details"].removeprefix("Reference ")
    logged = [r for r in caplog.records if outcome.error["reference"] in r.getMessage()]
    assert [r.levelname for r in logged] == ["WARNING"]


async def test_handoff_reports_through_the_reporter_and_logs_durations() -> None:
    """call_agent: agent_status at 0, the agent's own reports, complete with its summary."""
    published: list[Any] = []

    async def publish(event: Any) -> None:
        published.append(event)

    class Result:
        def summary(self) -> dict[str, Any]:
            return {"units": 42}

    async def agent(context: Mapping[str, int], report: Reporter) -> Result:
        await report("Halfway", 50, {"n": context["n"]})
        return Result()

    manager = AgentHandoffManager(publish)
    manager.register("counter", agent)
    with pytest.raises(ValueError):
        manager.register("counter", agent)
    result = await manager.call_agent("counter", {"n": 7}, session_id="handoff-0001")
    assert isinstance(result, Result)
    assert [(e.type, e.progress) for e in published] == [
        ("agent_status", 0),
        ("agent_status", 50),
        ("complete", 100),
    ]
    assert published[1].data == {"n": 7} and published[2].data == {"units": 42}
    # Without a session, nothing is published, but the call is still logged.
    await manager.call_agent("counter", {"n": 1})
    assert len(published) == 3 and len(manager.execution_log) == 2

    async def broken(context: Any, report: Reporter) -> None:
        raise KeyError("x")

    manager.register("broken", broken)
    with pytest.raises(AgentFailed):
        await manager.call_agent("broken", None, session_id="handoff-0001")
    assert published[-1].type == "error" and published[-1].code == "agent_failed"


@pytest.mark.parametrize(
    "answer",
    [SessionEnded("handoff-0002"), ServiceUnavailable("The event store is unavailable.")],
    ids=["session ended elsewhere", "store unavailable"],
)
async def test_a_report_the_event_store_refuses_is_not_the_agents_failure(
    answer: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """When the store refuses an agent's own report (the session was ended elsewhere, the
    store cannot be reached), that answer reaches the runner as it is: no agent error is
    logged with a traceback, nor an ``agent_failed`` event published."""
    published: list[Any] = []

    async def publish(event: Any) -> None:
        if event.type == "agent_status" and event.progress == 50:
            raise answer
        published.append(event)

    async def agent(context: Any, report: Reporter) -> None:
        await report("Halfway", 50)

    manager = AgentHandoffManager(publish)
    manager.register("demand", agent)
    with pytest.raises(type(answer)):
        await manager.call_agent("demand", None, session_id="handoff-0002")
    assert [e.type for e in published] == ["agent_status"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Nor is it counted as one, in the log behind the agent metrics.
    assert [r.outcome for r in manager.execution_log] == ["interrupted"]


async def test_an_agent_cancelled_with_its_run_is_interrupted_not_failed() -> None:
    """A run cancelled around an agent (shutdown, the session ended) is not the agent's
    failure: no ``agent_failed`` event, and the call is recorded as ``interrupted``."""
    published: list[Any] = []
    started = asyncio.Event()

    async def publish(event: Any) -> None:
        published.append(event)

    async def agent(context: Any, report: Reporter) -> None:
        started.set()
        await asyncio.Event().wait()

    manager = AgentHandoffManager(publish)
    manager.register("demand", agent)
    call = asyncio.create_task(manager.call_agent("demand", None, session_id="handoff-0003"))
    await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert [e.type for e in published] == ["agent_status"]
    assert [r.outcome for r in manager.execution_log] == ["interrupted"]


async def test_an_agent_that_answered_succeeded_though_its_complete_was_refused() -> None:
    """The agent did its work; the store refusing its ``complete`` ends the run, but the
    call is recorded as the agent's success."""

    async def publish(event: Any) -> None:
        if event.type == "complete":
            raise SessionEnded("handoff-0004")

    async def agent(context: Any, report: Reporter) -> int:
        return 1

    manager = AgentHandoffManager(publish)
    manager.register("demand", agent)
    with pytest.raises(SessionEnded):
        await manager.call_agent("demand", None, session_id="handoff-0004")
    assert [r.outcome for r in manager.execution_log] == ["success"]


async def test_a_running_forecast_does_not_delay_another_sessions_stream(
    client: AppClient,
) -> None:
    """While a real forecast runs in one session, events published into another reach
    their WebSocket subscriber promptly: model fitting never stalls the event loop."""
    hub = app_of(client.server)[STREAM_CONTEXT].hub
    response = await client.post(
        "/api/orchestrator/run-workflow",
        json={
            "strategy_description": "5% off all products for 26 weeks",
            "session_id": "busy-session-1",
        },
    )
    assert response.status == 202
    latencies: list[float] = []
    async with client.ws_connect("/ws/orchestrator/quiet-session-1") as ws:
        snapshot: dict[str, Any] = {"state": "running"}
        n = 0
        while snapshot["state"] in ("pending", "running"):
            n += 1
            sent = time.perf_counter()
            stored: StoredEvent = await hub.publish(
                ProgressEvent(
                    session_id="quiet-session-1", agent="probe", status=f"{n}", progress=1
                )
            )
            while True:  # skip heartbeats
                message = await ws.receive(timeout=EVENT_TIMEOUT)
                assert message.type is WSMsgType.TEXT
                received = json.loads(message.data)
                if received["type"] != "heartbeat":
                    break
            assert received["id"] == stored.id
            latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(0.02)  # pacing between probes, not synchronisation
            snapshot = await (await client.get("/api/sessions/busy-session-1")).json()
    assert snapshot["state"] == "complete"
    assert len(latencies) >= 5, "the forecast finished before it could be probed"
    assert max(latencies) < 0.25, f"slowest delivery {max(latencies) * 1000:.0f} ms"


class HoldingStore(MemoryBroker):
    """The in-memory store, whose append of a workflow's final ``complete`` waits until the
    test releases it (as the round trip to Redis does), then fails if ``down``; the
    append of a cancel waits for ``cancels`` (open unless the test closes it)."""

    def __init__(self) -> None:
        super().__init__(500, 60.0)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.down = False
        self.cancels = asyncio.Event()
        self.cancels.set()

    async def append(
        self, session_id: str, type: str, body: str, final: bool, key: Any = None
    ) -> StoredEvent:
        if final and type == "complete":
            self.holding.set()
            await self.release.wait()
            if self.down:
                raise ServiceUnavailable("The event store is unavailable; try again shortly.")
        if final and '"workflow_cancelled"' in body:
            await self.cancels.wait()
        return await super().append(session_id, type, body, final, key)


@pytest.fixture
async def holding_rig() -> AsyncIterator[tuple[Rig, HoldingStore]]:
    rig = Rig()
    store = HoldingStore()
    rig.hub = Hub(store, queue_size=500, metrics=rig.metrics)
    rig.handoff = AgentHandoffManager(rig.hub.publish, default_timeout=30.0)
    rig.runner = WorkflowRunner(rig.hub, rig.handoff, rig.metrics)
    await rig.hub.start()
    resources = register_agents(rig.handoff, None, forecast_workers=1)
    yield rig, store
    store.release.set()
    await rig.runner.close()
    await rig.hub.close()
    await resources.close()


def outcomes(rig: Rig) -> dict[str, float]:
    return {
        label: rig.metrics.registry.get_sample_value(
            "orchestrator_workflows_total", {"outcome": label}
        )
        or 0.0
        for label in ("complete", "failed", "cancelled", "interrupted")
    }


async def test_a_final_event_that_beats_the_runs_own_is_the_runs_outcome(
    holding_rig: tuple[Rig, HoldingStore],
) -> None:
    """The run has its result and is storing its ``complete`` when a cancel through
    another process stores ``workflow_cancelled`` first: the run's outcome (what
    ``?wait=true`` answers) and its count say cancelled, as the stream does."""
    rig, store = holding_rig
    task = await rig.runner.start("workflow-race-0001", STRATEGY)
    await asyncio.wait_for(store.holding.wait(), WORKFLOW_TIMEOUT)
    elsewhere = workflow_end(
        "workflow-race-0001", "workflow_cancelled", "The forecast was cancelled."
    )
    await rig.hub.publish(elsewhere)  # what the cancel through another process stores
    store.release.set()
    outcome = await asyncio.wait_for(task, EVENT_TIMEOUT)
    assert (outcome.status, outcome.result) == ("failed", None)
    assert outcome.error is not None and outcome.error["code"] == "workflow_cancelled"
    events = await rig.events("workflow-race-0001")
    assert [e.get("code") for e in events if e.get("final")] == ["workflow_cancelled"]
    assert outcomes(rig) == {"complete": 0, "failed": 0, "cancelled": 1, "interrupted": 0}
    assert not rig.runner.leases.holds("workflow-race-0001")


async def test_a_cancel_through_its_own_process_once_the_run_has_its_result_is_refused(
    holding_rig: tuple[Rig, HoldingStore],
) -> None:
    """The run has its result and is storing its ``complete``: a cancel through its own
    process is 409 ``session_ended`` (the run has ended), and the result stands."""
    rig, store = holding_rig
    task = await rig.runner.start("workflow-race-0002", STRATEGY)
    await asyncio.wait_for(store.holding.wait(), WORKFLOW_TIMEOUT)
    with pytest.raises(Conflict) as refused:
        await rig.runner.cancel("workflow-race-0002")
    assert refused.value.code == "session_ended"
    store.release.set()
    outcome = await asyncio.wait_for(task, EVENT_TIMEOUT)
    assert outcome.status == "complete"
    last = (await rig.events("workflow-race-0002"))[-1]
    assert (last["type"], last["final"]) == ("complete", True)
    assert outcomes(rig) == {"complete": 1, "failed": 0, "cancelled": 0, "interrupted": 0}


async def test_a_run_whose_final_event_waits_for_the_store_cannot_be_cancelled(
    holding_rig: tuple[Rig, HoldingStore],
) -> None:
    """The run completed, but its ``complete`` could not be stored yet (the store is
    down): a cancel then is refused 409 ``session_ended``, and the ``complete`` is stored
    once the store is back."""
    rig, store = holding_rig
    store.down = True
    store.release.set()
    outcome = await asyncio.wait_for(
        await rig.runner.start("workflow-owed-0001", STRATEGY), WORKFLOW_TIMEOUT
    )
    assert outcome.status == "complete" and rig.runner.leases.owes("workflow-owed-0001")
    with pytest.raises(Conflict) as refused:
        await rig.runner.cancel("workflow-owed-0001")
    assert refused.value.code == "session_ended"
    store.down = False
    await rig.runner.leases.tick()
    events = await rig.events("workflow-owed-0001")
    assert [(e["type"], e.get("final")) for e in events][-1] == ("complete", True)
    assert not any(e.get("code") == "workflow_cancelled" for e in events)


async def test_shutdown_lets_a_run_that_is_storing_its_final_event_finish(
    holding_rig: tuple[Rig, HoldingStore],
) -> None:
    """``close()`` interrupts runs still in their steps; one already storing its final
    event is let finish, so that event is stored and the run answered, not cancelled."""
    rig, store = holding_rig
    task = await rig.runner.start("workflow-closing-0001", STRATEGY)
    await asyncio.wait_for(store.holding.wait(), WORKFLOW_TIMEOUT)
    closing = asyncio.create_task(rig.runner.close(grace=0.0))
    await asyncio.sleep(0)  # close() has looked at the runs and waits for them
    assert not closing.done()
    store.release.set()
    await asyncio.wait_for(closing, EVENT_TIMEOUT)
    assert not task.cancelled()
    assert task.result().status == "complete"
    last = (await rig.events("workflow-closing-0001"))[-1]
    assert (last["type"], last["final"]) == ("complete", True)


async def test_shutdown_right_after_a_start_still_ends_the_run_with_a_final_event(
    rig: Rig,
) -> None:
    """``close()`` in the very loop turn a run was started in (before its task ever ran):
    the run still ends with ``workflow_interrupted`` stored and an outcome, not as a
    cancelled task that no ``?wait=true`` would be answered by."""
    task = await rig.runner.start("workflow-early-0001", STRATEGY)
    await rig.runner.close(grace=0.0)
    assert not task.cancelled()
    outcome = task.result()
    assert outcome.error is not None and outcome.error["code"] == "workflow_interrupted"
    last = (await rig.events("workflow-early-0001"))[-1]
    assert (last["code"], last["final"]) == ("workflow_interrupted", True)


class SlowClaimStore(MemoryBroker):
    """The in-memory store, whose claims wait until the test lets them through."""

    def __init__(self, down: bool) -> None:
        super().__init__(500, 60.0)
        self.claiming = asyncio.Event()
        self.let_through = asyncio.Event()
        self.down = down  # appends fail

    async def claim(self, session_id: str, lease: Any = None) -> bool:
        self.claiming.set()
        await self.let_through.wait()
        return await super().claim(session_id, lease)

    async def append(
        self, session_id: str, type: str, body: str, final: bool, key: Any = None
    ) -> StoredEvent:
        if self.down:
            raise ServiceUnavailable("The event store is unavailable; try again shortly.")
        return await super().append(session_id, type, body, final, key)


@pytest.mark.parametrize("down", [False, True], ids=["store up", "store down"])
async def test_a_claim_on_its_way_when_shutdown_begins_ends_its_session_at_once(
    down: bool,
) -> None:
    """``run-workflow`` is claiming its session when shutdown begins: once the claim is
    through, the session is ended (``workflow_interrupted``, so a subscriber already
    waiting on it is not left waiting) and the start refused (``shutting_down``). With
    the store down then, nothing is left owed that no one would retry (the lease lapses
    and other processes' monitors end the session)."""
    store = SlowClaimStore(down)
    metrics = Metrics()
    hub = Hub(store, queue_size=100, metrics=metrics)
    runner = WorkflowRunner(hub, AgentHandoffManager(hub.publish), metrics)
    await hub.start()
    try:
        starting = asyncio.create_task(runner.start("workflow-late-0001", STRATEGY))
        await asyncio.wait_for(store.claiming.wait(), EVENT_TIMEOUT)
        await runner.close(grace=0.0)
        store.let_through.set()
        with pytest.raises(ServiceUnavailable) as refused:
            await asyncio.wait_for(starting, EVENT_TIMEOUT)
        assert refused.value.code == "shutting_down"
        replay = await store.read("workflow-late-0001", None)
        if not down:
            assert [(e.type, e.final) for e in replay.events] == [("error", True)]
            assert replay.events[0].to_dict()["code"] == "workflow_interrupted"
        assert runner.running == 0 and not runner.leases.holds("workflow-late-0001")
        assert not runner.leases.owes("workflow-late-0001")
    finally:
        await hub.close()


async def test_a_run_stopped_by_another_final_event_is_answered_even_if_the_store_hangs(
    holding_rig: tuple[Rig, HoldingStore],
) -> None:
    """A run whose own final event lost to another reads that event to say how it ended;
    a store that never answers that read holds the run up for ``FINAL_READ_TIMEOUT`` at
    most: it is answered (``workflow_interrupted``, "ended elsewhere"), not left hanging."""
    rig, store = holding_rig
    task = await rig.runner.start("workflow-hang-0001", STRATEGY)
    await asyncio.wait_for(store.holding.wait(), WORKFLOW_TIMEOUT)
    await rig.hub.publish(workflow_end("workflow-hang-0001", "quota_exceeded", "Used up."))

    async def never(session_id: str) -> Any:
        await asyncio.Event().wait()

    store.info = never  # type: ignore[method-assign]
    store.release.set()
    outcome = await asyncio.wait_for(task, FINAL_READ_TIMEOUT + EVENT_TIMEOUT)
    assert outcome.error == {
        "code": "workflow_interrupted",
        "error": "The session was ended elsewhere.",
    }


async def test_a_final_event_stored_elsewhere_during_the_shutdown_grace_is_the_runs_outcome(
    holding_rig: tuple[Rig, HoldingStore],
) -> None:
    """During shutdown's grace period runs go on as usual: one whose own final event loses
    to a cancel through another process still ends as cancelled (not "interrupted")."""
    rig, store = holding_rig
    task = await rig.runner.start("workflow-grace-0001", STRATEGY)
    await asyncio.wait_for(store.holding.wait(), WORKFLOW_TIMEOUT)
    closing = asyncio.create_task(rig.runner.close(grace=WORKFLOW_TIMEOUT))
    await asyncio.sleep(0)  # close() has begun: its grace period runs
    assert rig.runner.closing
    cancelled = workflow_end(
        "workflow-grace-0001", "workflow_cancelled", "The forecast was cancelled."
    )
    await rig.hub.publish(cancelled)
    store.release.set()
    outcome = await asyncio.wait_for(task, EVENT_TIMEOUT)
    await asyncio.wait_for(closing, EVENT_TIMEOUT)
    assert outcome.error is not None and outcome.error["code"] == "workflow_cancelled"
    assert outcomes(rig)["cancelled"] == 1


async def test_a_cancel_stored_while_the_run_stores_its_result_wins_even_if_that_fails(
    holding_rig: tuple[Rig, HoldingStore],
) -> None:
    """A cancel through the run's own process, sent while the run was in its steps, is
    stored while the run's ``complete`` is on its way; the store then refuses the
    ``complete``. The cancel is the session's end: the run ends as cancelled, and
    nothing is left owed."""
    rig, store = holding_rig
    store.cancels.clear()
    task = await rig.runner.start("workflow-both-0001", STRATEGY)
    cancelling = asyncio.create_task(rig.runner.cancel("workflow-both-0001"))
    await asyncio.wait_for(store.holding.wait(), WORKFLOW_TIMEOUT)  # the run has its result
    store.cancels.set()
    await asyncio.wait_for(cancelling, EVENT_TIMEOUT)  # stored: 200
    store.down = True
    store.release.set()
    outcome = await asyncio.wait_for(task, EVENT_TIMEOUT)
    assert outcome.error is not None and outcome.error["code"] == "workflow_cancelled"
    assert not rig.runner.leases.owes("workflow-both-0001")
    assert outcomes(rig) == {"complete": 0, "failed": 0, "cancelled": 1, "interrupted": 0}
