"""What a strategy asks for: the typed parameters every agent after extraction works from."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Category = Literal["outdoor_furniture", "garden_tools", "grills", "heating", "lighting"]
CategoryChoice = Literal[
    "outdoor_furniture", "garden_tools", "grills", "heating", "lighting", "all"
]
Channel = Literal["online", "store", "all"]

CATEGORIES: tuple[str, ...] = get_args(Category)
CATEGORY_NAMES: dict[str, str] = {
    "outdoor_furniture": "Outdoor furniture",
    "garden_tools": "Garden tools",
    "grills": "Grills & BBQ",
    "heating": "Outdoor heating",
    "lighting": "Outdoor lighting",
    "all": "All categories",
}
DEFAULT_HORIZON_WEEKS = 12
DEFAULT_SERVICE_LEVEL = 0.95


class ForecastParameters(BaseModel):
    """The scenario to forecast. Every field has a default, so an empty strategy is valid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    product_category: CategoryChoice = Field(
        default="all", description="a category of the sales history, or 'all'"
    )
    horizon_weeks: int = Field(
        default=DEFAULT_HORIZON_WEEKS, ge=1, le=52, description="weeks to forecast"
    )
    price_change_pct: float = Field(
        default=0.0,
        ge=-50.0,
        le=50.0,
        description="change of the list price in percent: -15 means 15 % off, 5 means 5 % dearer",
    )
    promotion: bool = Field(
        default=False, description="a promotion (campaign, sale, coupon ...) runs all horizon long"
    )
    channel: Channel = Field(default="all", description="sales channel: online, store or all")
    service_level: float = Field(
        default=DEFAULT_SERVICE_LEVEL,
        ge=0.5,
        le=0.999,
        description="share of lead-time demand the inventory plan must cover without stock-out",
    )
    lead_time_weeks: int | None = Field(
        default=None,
        ge=1,
        le=26,
        description="supplier lead time in weeks; None uses each product's own lead time",
    )

    @property
    def category_name(self) -> str:
        return CATEGORY_NAMES[self.product_category]

    def describe(self) -> str:
        """One line, e.g. ``Outdoor furniture, 8 weeks, price -15 %, promotion, all channels``."""
        parts = [self.category_name, f"{self.horizon_weeks} weeks"]
        if self.price_change_pct:
            parts.append(f"price {self.price_change_pct:+g} %")
        parts.append("promotion" if self.promotion else "no promotion")
        parts.append("all channels" if self.channel == "all" else f"{self.channel} only")
        return ", ".join(parts)


class ExtractionResult(BaseModel):
    """The extraction agent's result: the parameters, and how they were obtained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parameters: ForecastParameters
    method: Literal["llm", "rules"]
    model: str | None = Field(default=None, description="the language model used, if any")
    fallback_reason: str | None = Field(
        default=None, description="why the language model was not used (safe text)"
    )
    notes: list[str] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "method": self.method,
            "parameters": self.parameters.model_dump(mode="json"),
            "description": self.parameters.describe(),
        }
        if self.model:
            summary["model"] = self.model
        if self.fallback_reason:
            summary["fallback_reason"] = self.fallback_reason
        if self.notes:
            summary["notes"] = list(self.notes)
        return summary
