"""The agents of the workflow, and :func:`register_agents` to put them in a handoff manager.

========== ============================ ==========================================
name       context                      result
========== ============================ ==========================================
extraction ``str`` (the strategy)        :class:`ExtractionResult`
demand     :class:`ForecastParameters`   :class:`DemandForecast`
inventory  :class:`InventoryRequest`     :class:`InventoryPlan`
pricing    :class:`PricingRequest`       :class:`PricingPlan`
========== ============================ ==========================================

Agents report progress through the reporter they are handed and never import
the hub, the brokers or the web server.
"""

from __future__ import annotations

from .demand import DemandAgent, DemandForecast, ForecastExecutor
from .extraction import ExtractionAgent
from .handoff import AgentHandoffManager
from .inventory import InventoryPlan, InventoryRequest, inventory_agent
from .llm import LLMSettings
from .parameters import ExtractionResult, ForecastParameters
from .pricing import PricingPlan, PricingRequest, pricing_agent

__all__ = [
    "AgentResources",
    "DemandForecast",
    "ExtractionResult",
    "ForecastParameters",
    "InventoryPlan",
    "InventoryRequest",
    "LLMSettings",
    "PricingPlan",
    "PricingRequest",
    "register_agents",
]


class AgentResources:
    """What the registered agents hold on to: the forecast process pool. Close it at shutdown."""

    def __init__(self, executor: ForecastExecutor) -> None:
        self.executor = executor

    async def close(self) -> None:
        await self.executor.close()


def register_agents(
    manager: AgentHandoffManager,
    llm: LLMSettings | None = None,
    *,
    forecast_workers: int | None = None,
) -> AgentResources:
    """Register "extraction", "demand", "inventory" and "pricing" in ``manager``.

    ``llm`` of None, or one without credentials, means rule-based extraction (announced in
    the stream). ``forecast_workers`` sizes the process pool (default: one per CPU).
    """
    executor = ForecastExecutor(forecast_workers)
    manager.register("extraction", ExtractionAgent(llm))
    manager.register("demand", DemandAgent(executor))
    manager.register("inventory", inventory_agent)
    manager.register("pricing", pricing_agent)
    return AgentResources(executor)
