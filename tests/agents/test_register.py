"""register_agents: the four agents, handed to each other as the workflow does, in one stream."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from server.agents import (
    InventoryRequest,
    LLMSettings,
    PricingRequest,
    register_agents,
)
from server.agents.handoff import AgentFailed, AgentHandoffManager
from server.messages import AgentStatusEvent, CompleteEvent

SESSION = "agents-test-0001"
DEFAULT_STRATEGY = "15% off outdoor furniture for 8 weeks"  # the demo page's
MAX_RESULT_BYTES = 200_000


async def test_the_chain_of_agents_for_the_default_strategy() -> None:
    """extraction -> demand -> inventory -> pricing through the manager: each agent's events,
    real numbers in its updates, and a final result well under 200 KB."""
    events: list[BaseModel] = []

    async def publish(event: BaseModel) -> None:
        events.append(event)

    manager = AgentHandoffManager(publish)
    resources = register_agents(manager, LLMSettings.from_env({}), forecast_workers=2)
    assert manager.agents == ("extraction", "demand", "inventory", "pricing")
    try:
        call = manager.call_agent
        extraction = await call("extraction", DEFAULT_STRATEGY, session_id=SESSION)
        params = extraction.parameters
        forecast = await call("demand", params, session_id=SESSION)
        inventory = await call(
            "inventory", InventoryRequest(parameters=params, forecast=forecast), session_id=SESSION
        )
        pricing = await call(
            "pricing", PricingRequest(parameters=params, forecast=forecast), session_id=SESSION
        )
    finally:
        await resources.close()

    assert (params.product_category, params.horizon_weeks, params.price_change_pct) == (
        "outdoor_furniture", 8, -15.0
    )  # fmt: skip
    result = {
        "parameters": params.model_dump(mode="json"),
        "extraction_method": extraction.method,
        "forecast": forecast.model_dump(mode="json"),
        "inventory": inventory.model_dump(mode="json"),
        "pricing": pricing.model_dump(mode="json"),
    }
    assert len(json.dumps(result)) < MAX_RESULT_BYTES
    assert [p.product_id for p in inventory.products] == [
        p.product.product_id for p in forecast.products
    ]

    completes = [e for e in events if isinstance(e, CompleteEvent)]
    assert [e.agent for e in completes] == ["extraction", "demand", "inventory", "pricing"]
    assert completes[0].data["method"] == "rules"
    assert completes[1].data["total_units"] == round(forecast.total.total_units)
    statuses = [e.status for e in events if isinstance(e, AgentStatusEvent)]
    assert "Language model unavailable (no credentials configured); used rule-based extraction" in (
        statuses
    )
    assert (
        sum(s.startswith("Forecasting ") and "/5 Outdoor furniture · " in s for s in statuses) == 5
    )
    for event in events:  # every event is JSON as it goes on the wire
        json.dumps(event.model_dump(mode="json"))


async def test_after_close_the_demand_agent_fails_cleanly() -> None:
    """Once the resources are closed a forecast fails as an agent failure, not a hang."""

    async def publish(event: BaseModel) -> None:
        return None

    manager = AgentHandoffManager(publish)
    resources = register_agents(manager, None, forecast_workers=1)
    await resources.close()
    extraction = await manager.call_agent("extraction", "grills for 4 weeks")
    with pytest.raises(AgentFailed):
        await manager.call_agent("demand", extraction.parameters)
