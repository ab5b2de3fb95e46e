"""The rule-based extractor on a table of phrasings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.agents.extraction import extract_rule_based
from server.agents.parameters import ForecastParameters
from server.agents.rules import extract_rules

DEFAULTS = ForecastParameters().model_dump()

# (strategy, the fields that must differ from the defaults)
CASES: list[tuple[str, dict[str, Any]]] = [
    (
        "15% off outdoor furniture for 8 weeks",
        {"product_category": "outdoor_furniture", "horizon_weeks": 8, "price_change_pct": -15.0,
         "promotion": True},
    ),
    (
        "Run a 20% discount on grills online over the next 3 months",
        {"product_category": "grills", "horizon_weeks": 13, "price_change_pct": -20.0,
         "promotion": True, "channel": "online"},
    ),
    (
        "Cut prices on garden tools by 10% in stores for six weeks, no promotion",
        {"product_category": "garden_tools", "horizon_weeks": 6, "price_change_pct": -10.0,
         "channel": "store"},
    ),
    (
        "Raise lighting prices 5% for a quarter",
        {"product_category": "lighting", "horizon_weeks": 13, "price_change_pct": 5.0},
    ),
    (
        "Price increase of 7.5% on fire pits over 12 weeks, omnichannel",
        {"product_category": "heating", "horizon_weeks": 12, "price_change_pct": 7.5},
    ),
    (
        "Increase sales of patio heaters by 10% with a promo campaign for 4 weeks",
        {"product_category": "heating", "horizon_weeks": 4, "promotion": True},
    ),
    (
        "Forecast everything for the next year at a 98% service level with a 3-week lead time",
        {"horizon_weeks": 52, "service_level": 0.98, "lead_time_weeks": 3},
    ),
    (
        "Half price string lights for a fortnight",
        {"product_category": "lighting", "horizon_weeks": 2, "price_change_pct": -50.0,
         "promotion": True},
    ),
    (
        "BOGO on pizza ovens for 30 days online and in-store",
        {"product_category": "grills", "horizon_weeks": 5, "promotion": True},
    ),
    (
        "Store-wide sale: 25 percent off for the next 2 weeks",
        {"horizon_weeks": 2, "price_change_pct": -25.0, "promotion": True},
    ),
    (
        "What if we drop the price of teak benches by twenty percent?",
        {"product_category": "outdoor_furniture", "price_change_pct": -20.0},
    ),
    (
        "a 12.5% price cut on garden furniture for 2 months",
        {"product_category": "outdoor_furniture", "horizon_weeks": 9, "price_change_pct": -12.5},
    ),
    (
        "Patio heaters, web shop only, lead time of 10 days, 16-week horizon",
        {"product_category": "heating", "horizon_weeks": 16, "channel": "online",
         "lead_time_weeks": 2},
    ),
    (
        "Lawn mowers -10% price, no promotion, 26 weeks",
        {"product_category": "garden_tools", "horizon_weeks": 26, "price_change_pct": -10.0},
    ),
    (
        "BBQ flash sale with 30% off in our stores for half a year",
        {"product_category": "grills", "horizon_weeks": 26, "price_change_pct": -30.0,
         "promotion": True, "channel": "store"},
    ),
    (
        "Lanterns: price +8% for 100 weeks",
        {"product_category": "lighting", "horizon_weeks": 52, "price_change_pct": 8.0},
    ),
    ("", {}),
]  # fmt: skip


@pytest.mark.parametrize(("strategy", "expected"), CASES, ids=[c[0][:40] or "empty" for c in CASES])
def test_phrasings(strategy: str, expected: dict[str, Any]) -> None:
    """Each phrasing gives exactly the expected parameters, the rest left at their defaults."""
    assert extract_rule_based(strategy).model_dump() == {**DEFAULTS, **expected}


@pytest.mark.parametrize(
    ("strategy", "promotion"),
    [
        ("grills for 8 weeks, no sale", False),
        ("grills for 8 weeks, not on sale", False),
        ("grills for 8 weeks without discounting", False),
        ("grills for 8 weeks, no discounted prices", False),
        ("grills for 8 weeks, don't run any kind of promotion", False),
        # The negation is of something else: the promotion stands.
        ("grills for 8 weeks, no markdown but a promotion", True),
        ("grills for 8 weeks, not online, with a promo", True),
    ],
)
def test_a_negated_promotion_is_no_promotion(strategy: str, promotion: bool) -> None:
    """*No / without / not … promotion, sale, discount, deal* (README), with a few words
    between (*not on sale*) and the word's forms (*discounted*, *discounting*)."""
    assert extract_rules(strategy).parameters.promotion is promotion


def test_a_percentage_that_is_not_a_price_is_not_read_as_one() -> None:
    """'increase sales by 10 %' and a service level are not price changes."""
    params = extract_rule_based("increase sales by 10% at a 90% service level for 8 weeks")
    assert params.price_change_pct == 0.0
    assert params.service_level == pytest.approx(0.90)


def test_a_price_change_without_direction_is_noted_not_guessed() -> None:
    """'a 10 % price change' says neither up nor down: unchanged, with a note saying so."""
    found = extract_rules("10% price change for BBQs over 8 weeks")
    assert found.parameters.price_change_pct == 0.0
    assert any("names no direction" in note for note in found.notes)


def test_defaults_are_noted() -> None:
    """A strategy naming no horizon and no category says which defaults it used."""
    notes = extract_rules("make more money").notes
    assert any("no horizon given; used 12 weeks" in note for note in notes)
    assert any("forecasting all categories" in note for note in notes)


def test_several_categories_pick_the_first_and_say_so() -> None:
    """Two categories: the first is forecast, and a note names the other."""
    found = extract_rules("Outdoor furniture and grills, 8 weeks, -10% price")
    assert found.parameters.product_category == "outdoor_furniture"
    assert any("Grills & BBQ" in note for note in found.notes)


def test_out_of_range_values_are_limited_and_noted() -> None:
    """A 70 % cut and a 2-year horizon are held to the model's bounds, with notes."""
    found = extract_rules("70% off heaters for 2 years")
    assert found.parameters.price_change_pct == -50.0
    assert found.parameters.horizon_weeks == 52
    assert len(found.notes) >= 2


# (before, repeated, after): texts built to make regular expressions backtrack.
HOSTILE: dict[str, tuple[str, str, str]] = {
    "digits": ("", "1", ""),
    "percentages": ("", "5% ", ""),
    "negations": ("no ", "a ", ""),
    "categories": ("", "patio ", ""),
    "decimals": ("", "12.5", ""),
    "spaces after a number": ("1", " ", "x"),
    "newlines after a number": ("1", "\n", "x"),
    "spaces after a percentage": ("95", " ", "x"),
    "spaces after service level": ("service level", " ", "x"),
    "spaces after lead time": ("lead time", " ", "x"),
}
# Characters each hostile text is built to: 25 times the 4,000 the API takes.
HOSTILE_LENGTH = 100_000
_READ_HOSTILE = """
import json, sys
from server.agents.rules import extract_rules
before, repeated, after = json.loads(sys.argv[1])
extract_rules(before + repeated * (int(sys.argv[2]) // len(repeated)) + after)
"""


@pytest.mark.parametrize("parts", HOSTILE.values(), ids=HOSTILE.keys())
def test_long_hostile_text_is_read_in_linear_time(parts: tuple[str, str, str]) -> None:
    """The extractor runs on the event loop, so a text built to make its regular
    expressions backtrack would hold every stream. Each is read in time linear in its
    length: 100,000 characters in about a tenth of a second here, where one pattern that
    backtracked through every split of a run of spaces took half a second at 4,000
    characters, and would take minutes at this length. The child process is killed if
    it runs a minute, so a quadratic pattern fails this test rather than hangs it."""
    command = [sys.executable, "-c", _READ_HOSTILE, json.dumps(parts), str(HOSTILE_LENGTH)]
    subprocess.run(command, check=True, timeout=60, cwd=Path(__file__).parents[2])


def test_runs_of_spaces_do_not_change_what_is_read() -> None:
    """The patterns rewritten against backtracking read what they read before, with any
    run of spaces or a hyphen between a number and its unit."""
    found = extract_rules(
        "95%   service level, 3 -  week lead time, 15 %  off grills for 6\n weeks"
    )
    assert found.parameters.service_level == 0.95
    assert found.parameters.lead_time_weeks == 3
    assert found.parameters.price_change_pct == -15.0
    assert found.parameters.horizon_weeks == 6
    found = extract_rules("service level of  90 percent, lead time is 2-weeks, 10% off lamps")
    assert (found.parameters.service_level, found.parameters.lead_time_weeks) == (0.9, 2)


@pytest.mark.parametrize(
    "strategy",
    [
        "grills for " + "9" * 400 + " weeks",
        "grills for 8 weeks with a lead time of " + "9" * 320 + " days",
        "9" * 400 + "% off grills for 8 weeks",
    ],
    ids=["horizon", "lead time", "price change"],
)
def test_a_number_too_large_for_a_float_is_held_to_its_range(strategy: str) -> None:
    """A number of hundreds of digits (well within a strategy's length) is read as
    very large, then held to its field's range like any number out of it; it does not
    fail the extraction (it was infinity, which no week count rounds)."""
    found = extract_rules(strategy)
    parameters = found.parameters
    assert 1 <= parameters.horizon_weeks <= 52
    assert parameters.lead_time_weeks is None or 1 <= parameters.lead_time_weeks <= 26
    assert -50 <= parameters.price_change_pct <= 50
    assert "inf" not in " ".join(found.notes)
