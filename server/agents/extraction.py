"""The extraction agent: strategy text to :class:`ForecastParameters`.

With a language model configured (:mod:`server.agents.llm`), the OpenAI SDK
asks it for the parameters as structured output (a strict JSON schema made
from a pydantic model, parsed back into it). With none, or when the model
times out, fails, refuses, or answers with something that does not validate,
the rule-based extractor (:mod:`server.agents.rules`) reads the text instead,
and the agent says so in its status line - never silently.

Nothing here logs or reports the API key, or the text of an SDK exception
(an HTTP 401's message quotes part of the key): only safe reasons such as
"timed out after 15 s" or "HTTP 429".
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .answer_cap import AnswerRefused
from .handoff import Reporter
from .llm import LLMSettings
from .parameters import (
    CATEGORY_NAMES,
    DEFAULT_HORIZON_WEEKS,
    DEFAULT_SERVICE_LEVEL,
    CategoryChoice,
    Channel,
    ExtractionResult,
    ForecastParameters,
)
from .rules import extract_rule_based, extract_rules

__all__ = [
    "ExtractionAgent",
    "ExtractionResult",
    "LLMUnavailable",
    "extract_rule_based",
    "extract_with_llm",
]

log = logging.getLogger(__name__)

FALLBACK_STATUS = "Language model unavailable ({reason}); used rule-based extraction"


class LLMOutput(BaseModel):
    """What the model must answer: every field required (a strict JSON schema), each of
    its JSON type (strict: ``true`` is not a week count, nor ``"8"`` a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    product_category: CategoryChoice = Field(
        description="the product category the strategy is about, or 'all'"
    )
    horizon_weeks: int = Field(description="forecast horizon in weeks, 1-52")
    price_change_pct: float = Field(
        description="price change in percent: -15 for 15% off, 5 for a 5% increase, 0 if none"
    )
    promotion: bool = Field(description="true if a promotion, sale, campaign or deal runs")
    channel: Channel = Field(description="'online', 'store', or 'all' if not restricted")
    service_level: float | None = Field(
        description="inventory service level as a fraction (0.95), or null if not stated"
    )
    lead_time_weeks: int | None = Field(
        description="supplier lead time in weeks, or null if not stated"
    )


SYSTEM_PROMPT = (
    "You turn a retailer's strategy, written in plain English, into forecast parameters. "
    "Product categories: "
    + "; ".join(f"'{slug}' ({name})" for slug, name in CATEGORY_NAMES.items() if slug != "all")
    + ". Use 'all' when the strategy names no category or several. "
    f"If no horizon is stated use {DEFAULT_HORIZON_WEEKS} weeks; a month is 4 weeks, a "
    "quarter 13, a year 52. A discount or '% off' is a negative price change and a promotion; "
    "a permanent price cut is a negative price change without a promotion. "
    "Answer with the parameters only."
)


class LLMUnavailable(Exception):
    """The model could not give parameters; ``reason`` is safe to show to users."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _status_reason(exc: openai.APIStatusError) -> str:
    code = exc.status_code
    if code == 429:
        return "rate limited, HTTP 429"
    if code in (401, 403):
        return f"credentials refused, HTTP {code}"
    if code >= 500:
        return f"server error, HTTP {code}"
    return f"request rejected, HTTP {code}"


def _validation_reason(exc: ValidationError) -> str:
    if any(error["type"] == "json_invalid" for error in exc.errors()):
        return "its answer was not valid JSON"
    return "its answer did not match the parameters schema"


def _to_parameters(output: LLMOutput) -> ForecastParameters:
    values: dict[str, Any] = output.model_dump()
    if values["service_level"] is None:
        values["service_level"] = DEFAULT_SERVICE_LEVEL
    return ForecastParameters.model_validate(values)


def answer_budget(settings: LLMSettings) -> float:
    """How long the model gets in all: each attempt's time-out, and one more (at most 5 s)
    for the back-off between them. The SDK bounds each read, not a whole answer, and
    waits as long as a 429's ``Retry-After`` says (up to two minutes): without one bound
    over it all, a rate-limited or trickling model would outlast the agent's own
    time-out, and the workflow would fail instead of using the rules."""
    return settings.timeout * (settings.max_retries + 1) + min(settings.timeout, 5.0)


def budget_warning(settings: LLMSettings, agent_timeout: float) -> str | None:
    """What to tell the operator when the model's budget is not below the agent's
    time-out: a slow model would then fail the workflow instead of ending in the rules."""
    budget = answer_budget(settings)
    if settings.provider is None or budget < agent_timeout:
        return None
    return (
        f"the language model may take up to {budget:g} s "
        "(OPENAI_TIMEOUT for each of 1 + OPENAI_MAX_RETRIES attempts, and the back-off), "
        f"not less than --agent-timeout ({agent_timeout:g} s): a slow model would fail "
        "the workflow instead of falling back to the rules; raise --agent-timeout or "
        "lower OPENAI_TIMEOUT"
    )


async def extract_with_llm(strategy: str, settings: LLMSettings) -> ForecastParameters:
    """Ask the model; raise :class:`LLMUnavailable` with a safe reason on any failure."""
    client = settings.client()
    budget = answer_budget(settings)
    try:
        async with asyncio.timeout(budget):
            completion = await client.chat.completions.parse(
                model=settings.model,
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    # Whole: its length is what run-workflow accepted (max_strategy_length).
                    {"role": "user", "content": strategy},
                ],
                response_format=LLMOutput,
                temperature=0,
            )
        if not completion.choices:
            raise LLMUnavailable("it returned no answer")
        message = completion.choices[0].message
        if message.refusal:
            raise LLMUnavailable("it refused to answer")
        if message.parsed is None:
            raise LLMUnavailable("its answer was empty")
        return _to_parameters(message.parsed)
    except LLMUnavailable:
        raise
    except TimeoutError:
        raise LLMUnavailable(f"no answer within {budget:g} s") from None
    except openai.APITimeoutError:
        raise LLMUnavailable(f"timed out after {settings.timeout:g} s") from None
    except AnswerRefused as exc:
        raise LLMUnavailable(exc.reason) from None
    except openai.APIStatusError as exc:
        raise LLMUnavailable(_status_reason(exc)) from None
    except openai.APIConnectionError:
        raise LLMUnavailable("could not connect") from None
    except openai.LengthFinishReasonError:
        raise LLMUnavailable("its answer was cut off") from None
    except openai.ContentFilterFinishReasonError:
        raise LLMUnavailable("its answer was filtered") from None
    except ValidationError as exc:
        raise LLMUnavailable(_validation_reason(exc)) from None
    except openai.OpenAIError as exc:
        raise LLMUnavailable(f"SDK error {type(exc).__name__}") from None
    except ValueError:  # malformed completion JSON, or a schema the SDK could not use
        raise LLMUnavailable("its answer could not be read") from None
    except Exception as exc:
        # An answer that is not a chat completion (a proxy's HTML page, `{}`, a list) is
        # taken apart by the SDK without checks: AttributeError, TypeError and the like.
        log.warning("extraction: the model's answer could not be read (%s)", type(exc).__name__)
        raise LLMUnavailable("its answer could not be read") from None
    finally:
        await client.close()


class ExtractionAgent:
    """``await agent(strategy, report) -> ExtractionResult``: the model first, then the rules."""

    def __init__(self, llm: LLMSettings | None = None) -> None:
        self._llm = llm

    async def __call__(self, strategy: str, report: Reporter) -> ExtractionResult:
        llm = self._llm
        if llm is not None and llm.enabled:
            # The model's name only: its host is an internal address, for the log.
            await report(f"Asking the language model ({llm.model}) to read the strategy", 10)
            try:
                parameters = await extract_with_llm(strategy, llm)
            except LLMUnavailable as exc:
                reason = exc.reason
                log.warning("extraction: language model unavailable (%s)", reason)
            else:
                await report(
                    f"Language model read: {parameters.describe()}",
                    90,
                    {"method": "llm", "parameters": parameters.model_dump(mode="json")},
                )
                return ExtractionResult(parameters=parameters, method="llm", model=llm.model)
        elif llm is not None:
            reason = llm.unavailable_reason or "not configured"
        else:
            reason = "not configured"

        rules = extract_rules(strategy)
        parameters = rules.parameters
        await report(
            FALLBACK_STATUS.format(reason=reason),
            90,
            {
                "method": "rules",
                "fallback_reason": reason,
                "parameters": parameters.model_dump(mode="json"),
                "notes": rules.notes,
            },
        )
        return ExtractionResult(
            parameters=parameters, method="rules", fallback_reason=reason, notes=rules.notes
        )
