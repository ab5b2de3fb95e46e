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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .demand import DemandForecast
    from .fit_pool import ForecastExecutor
    from .handoff import AgentHandoffManager
    from .inventory import InventoryPlan, InventoryRequest
    from .llm import LLMSettings
    from .parameters import ExtractionResult, ForecastParameters
    from .pricing import PricingPlan, PricingRequest

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

# Imported on first use, so that the forecast worker processes, which import
# ``server.agents.forecasting`` and with it this package, do not load the OpenAI SDK,
# pydantic models and the rest they never use.
_LAZY = {
    "DemandForecast": ".demand",
    "ExtractionResult": ".parameters",
    "ForecastParameters": ".parameters",
    "InventoryPlan": ".inventory",
    "InventoryRequest": ".inventory",
    "LLMSettings": ".llm",
    "PricingPlan": ".pricing",
    "PricingRequest": ".pricing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


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
    from .demand import DemandAgent
    from .extraction import ExtractionAgent
    from .fit_pool import ForecastExecutor
    from .inventory import inventory_agent
    from .pricing import pricing_agent

    executor = ForecastExecutor(forecast_workers)
    manager.register("extraction", ExtractionAgent(llm))
    manager.register("demand", DemandAgent(executor))
    manager.register("inventory", inventory_agent)
    manager.register("pricing", pricing_agent)
    return AgentResources(executor)
