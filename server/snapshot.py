"""A session's state, folded from its stored events (so any process can answer it)."""

from __future__ import annotations

import asyncio
from typing import Any

from .brokers.base import SessionInfo
from .loop_share import ByteBudget
from .messages import ORCHESTRATOR, StoredEvent, result_of


async def session_snapshot(
    session_id: str, info: SessionInfo, events: list[StoredEvent]
) -> dict[str, Any]:
    """``state`` is ``pending`` (nothing published yet), ``running``, ``complete`` or
    ``failed``; ``agents`` holds each agent's latest status and progress, and its state:
    ``running``, ``complete``, ``failed``, or ``stopped`` when the session ended first."""
    progress = 0
    agents: dict[str, dict[str, Any]] = {}
    result: Any = None
    error: dict[str, Any] | None = None
    state = "pending" if info.last_seq == 0 else "running"
    budget = ByteBudget()  # a thousand events of 256 KiB: see server.loop_share
    for stored in events:
        if budget.spent(len(stored.payload)):
            await asyncio.sleep(0)
        event = stored.to_dict()
        agent = event.get("agent")
        if event["type"] in ("agent_status", "progress", "complete") and agent != ORCHESTRATOR:
            agents[str(agent)] = {
                "status": event["status"],
                "progress": event["progress"],
                "state": "complete" if event["type"] == "complete" else "running",
            }
        elif event["type"] == "error" and agent and agent != ORCHESTRATOR:
            agents[str(agent)] = {
                **agents.get(str(agent), {"progress": 0}),
                "status": event["error"],
                "state": "failed",
            }
        if agent == ORCHESTRATOR and event["type"] in ("progress", "complete"):
            progress = max(progress, int(event["progress"]))
        if stored.final:
            if event["type"] == "complete":
                state, result = "complete", result_of(event)
            else:
                state = "failed"
                error = {k: event[k] for k in ("code", "error", "details")}
    if info.ended and state == "running":
        state = "complete"  # the final event was trimmed from a tiny buffer
    if state in ("complete", "failed"):
        # The session ended while these ran: done, if a complete session's agent was at
        # 100 % (a service that reports an agent's statuses only); else stopped before
        # they finished (a cancel, a restart, a service's final event).
        for status in agents.values():
            if status["state"] == "running":
                done = state == "complete" and status["progress"] == 100
                status["state"] = "complete" if done else "stopped"
    return {
        "session_id": session_id,
        "state": state,
        "last_event_id": events[-1].id if events else None,
        "last_seq": info.last_seq,
        "progress": progress,
        "agents": agents,
        "result": result,
        "error": error,
    }
