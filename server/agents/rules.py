"""Rule-based extraction: plain-English strategy text to :class:`ForecastParameters`.

No network, no model: a handful of regular expressions over the lower-cased
text, applied in an order that lets each rule *consume* what it understood
(so the "95 %" of a service level is never read as a price change, nor the
"3 weeks" of a lead time as the horizon). docs/AGENTS.md lists what it
understands; the tests hold a table of phrasings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .parameters import (
    CATEGORY_NAMES,
    DEFAULT_HORIZON_WEEKS,
    ForecastParameters,
)

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
    "twenty": 20, "twenty-five": 25, "thirty": 30, "forty": 40, "fifty": 50,
}  # fmt: skip
_NUMBER_WORD_RE = re.compile(
    r"\b(" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b"
)

# Category synonyms. Overlaps are resolved by the longest match ("patio heater" is heating,
# "patio" alone is outdoor furniture; "garden furniture" is furniture, "garden" alone tools).
_CATEGORY_PATTERNS: dict[str, tuple[str, ...]] = {
    "outdoor_furniture": (
        r"outdoor furniture",
        r"patio furniture",
        r"garden furniture",
        r"lawn furniture",
        r"furniture",
        r"patio sets?",
        r"patio",
        r"teak",
        r"bench(?:es)?",
        r"dining sets?",
        r"(?:sun )?loungers?",
        r"(?:garden )?parasols?",
        r"umbrellas?",
        r"hammocks?",
        r"deck ?chairs?",
    ),
    "garden_tools": (
        r"garden(?:ing)? tools?",
        r"gardening(?: supplies)?",
        r"garden",
        r"tools?",
        r"(?:lawn ?)?mowers?",
        r"lawn",
        r"pruning(?: shears)?",
        r"shears",
        r"secateurs",
        r"(?:garden )?hoses?",
        r"planters?(?: box(?:es)?)?",
    ),
    "grills": (
        r"grills?",
        r"grilling",
        r"bbqs?",
        r"barbec(?:ue|ues)",
        r"pizza ovens?",
        r"grill covers?",
        r"(?:kettle|gas|charcoal) grills?",
        r"charcoal",
    ),
    "heating": (
        r"outdoor heating",
        r"heating",
        r"(?:patio |wall |infrared )?heaters?",
        r"fire ?pits?",
        r"firepits?",
    ),
    "lighting": (
        r"outdoor lighting",
        r"lighting",
        r"(?:string |solar |path |fairy |flood ?|led )?lights",
        r"(?:led )?lanterns?",
        r"floodlights?",
        r"lamps?",
    ),
    "all": (
        r"all (?:products|categories|items|lines|departments)",
        r"every (?:category|product)",
        r"everything",
        r"store[- ]?wide",
        r"site[- ]?wide",
        r"(?:entire|whole|full) "
        r"(?:range|catalog(?:ue)?|assortment|store)",
        r"across the board",
        r"all (?:of )?our (?:products|range)",
    ),
}
_CATEGORY_RE = [
    (category, re.compile(r"\b(?:" + "|".join(patterns) + r")\b"))
    for category, patterns in _CATEGORY_PATTERNS.items()
]

# No two quantifiers may take turns over one run of spaces ("\s*x?\s*" is written
# "\s*(?:x\s*)?"): backtracking through every split of the run was quadratic, and 4,000
# characters of "1", spaces and "x" held the event loop for half a second.
_PERCENT_RE = re.compile(r"(?<![\w.])([+-]?\d+(?:\.\d+)?)\s*(?:%|percent\b|per cent\b|pct\b)")
_SERVICE_RE = re.compile(
    r"(?:(?<![\w.])(\d+(?:\.\d+)?)(?:\s*(?:%|percent|per cent))?\s+service[- ]level"
    r"|service[- ]level\s*(?:(?:of|at|=|:|to)\s*)?(\d+(?:\.\d+)?)(?:\s*(?:%|percent|per cent))?)"
)
_LEAD_TIME_RE = re.compile(
    r"(?:(?<![\w.])(\d+)\s*(?:-\s*)?(weeks?|wks?|days?)'?\s+(?:of\s+)?(?:supplier\s+)?"
    r"lead[- ]?times?"
    r"|lead[- ]?times?\s*(?:(?:of|is|=|:)\s*)?(\d+)\s*(?:-\s*)?(weeks?|wks?|days?))"
)
_HORIZON_RE = re.compile(
    r"(?:(?P<lead>for|over|next|during|within|across|horizon(?: of)?|the coming|coming)\s+)?"
    r"(?:(?:the\s+)?(?:next|coming)\s+)?"
    r"(?<![\w.])(?P<n>\d+(?:\.\d+)?|an?)\s*(?:-\s*)?"
    r"(?P<unit>weeks?|wks?|months?|mos?|quarters?|years?|yrs?|days?|fortnights?)\b"
)
_HORIZON_WORDS: tuple[tuple[re.Pattern[str], int, str], ...] = (
    (re.compile(r"\b(?:half a year|half[- ]year(?:ly)?|six[- ]months?)\b"), 26, "half a year"),
    (re.compile(r"\b(?:next|this|the coming|coming|a|one|for the)\s+quarter\b"), 13, "a quarter"),
    (re.compile(r"\bq[1-4]\b"), 13, "a quarter"),
    (re.compile(r"\b(?:next|this|the coming|coming|a|one|full|whole)\s+year\b"), 52, "a year"),
    (re.compile(r"\b(?:annual|year[- ]long|year[- ]round)\b"), 52, "a year"),
    (re.compile(r"\b(?:next|this|the coming|coming)\s+month\b"), 4, "a month"),
    (re.compile(r"\b(?:next|this|the coming|coming)\s+week\b"), 1, "a week"),
    (re.compile(r"\bfortnight\b"), 2, "a fortnight"),
)
_HALF_PRICE_RE = re.compile(r"\bhalf[- ](?:price|off)\b|\b50/50\b")
_BOGO_RE = re.compile(r"\b(?:bogo|b1g1|buy 1,? get 1(?: free)?|2 for 1|two for one|3 for 2)\b")
# Only these words may stand between the negation and what it negates ("not on sale", "no
# kind of discount"): with any word allowed, "no markdown but a promotion" would read as
# no promotion.
_PROMO_NEGATION_RE = re.compile(
    r"\b(?:no|without|not|don'?t|do not|skip|excluding|never)\s+(?:(?:run|running|any|a|an|on"
    r"|the|such|kind of|type of|form of)\s+)*(?:promo(?:tion)?s?|promotional|promoting"
    r"|sales? events?|campaigns?|discount(?:s|ed|ing)?|deals?|coupons?|sale)\b"
)
_PROMO_RE = re.compile(
    r"\b(?:promo(?:tion)?s?|promotional|promote[ds]?|promoting|campaigns?|deals?|coupons?"
    r"|vouchers?|clearance|flash sale|black friday|cyber monday|on sale|sale|bundles?"
    r"|featured|discount(?:s|ed|ing)?|% off|off)\b|%\s*off\b"
)
_ONLINE_RE = re.compile(
    r"\b(?:online|e-?commerce|web ?shop|website|web|digital(?:ly)?|internet|app|e-?shop"
    r"|mobile)\b"
)
_STORE_RE = re.compile(
    r"\b(?:in[- ]store|in[- ]stores|stores?|shops?|brick[- ]and[- ]mortar|physical|offline"
    r"|retail (?:stores?|locations?)|high street)\b"
)
_ALL_CHANNELS_RE = re.compile(
    r"\b(?:omni[- ]?channel|all channels|both channels|every channel|cross[- ]channel)\b"
)
_WINDOW = 120  # characters either side of a percentage in which to look for its meaning
_MAX_PERCENTAGES = 20  # percentages read at most (a strategy has one or two)
_CLAUSE_BREAK = re.compile(r"[,;.:!?()]|\b(?:and|but|while|whereas|then)\b")
_WORD_RE = re.compile(r"[a-z][a-z'-]*|[+-]?\d+(?:\.\d+)?%?")

# Words that say "cheaper" on their own, those that need a price word nearby to mean a
# price change ("cut prices by 10 %" yes, "cut costs by 10 %" no), and the price words.
_DOWN_ALWAYS = frozenset(
    {"off", "discount", "discounts", "discounted", "markdown", "markdowns", "cheaper", "save",
     "saving", "savings", "sale", "rebate"}
)  # fmt: skip
_DOWN = frozenset(
    {"cut", "cuts", "cutting", "reduce", "reduced", "reduces", "reducing", "reduction", "lower",
     "lowered", "lowering", "lowers", "drop", "drops", "dropped", "dropping", "decrease",
     "decreased", "decreases", "decreasing", "slash", "slashed", "slashing", "down", "less",
     "minus", "under"}
)  # fmt: skip
_UP = frozenset(
    {"raise", "raised", "raises", "raising", "increase", "increased", "increases", "increasing",
     "hike", "hiked", "hikes", "up", "higher", "rise", "rises", "rising", "more", "premium",
     "markup", "bump", "plus", "dearer", "pricier"}
)  # fmt: skip
_PRICE_WORDS = frozenset({"price", "prices", "pricing", "priced", "rrp", "msrp", "list"})


@dataclass
class RuleExtraction:
    """The parameters found in a text, and notes saying what was read and what was assumed."""

    parameters: ForecastParameters
    notes: list[str] = field(default_factory=list)


def _normalize(text: str) -> str:
    text = text.lower()
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", " - ")
    text = text.replace("\u2019", "'").replace("\u00a0", " ")
    return _NUMBER_WORD_RE.sub(lambda m: str(_NUMBER_WORDS[m.group(1)]), text)


def _blank(text: str, start: int, end: int) -> str:
    """Consume ``text[start:end]``: replace it by spaces, so offsets stay valid."""
    return _blank_all(text, [(start, end)])


def _blank_all(text: str, spans: list[tuple[int, int]]) -> str:
    """Consume every ``(start, end)`` of ``spans`` (in order, not overlapping) in one copy of
    ``text``: one copy per span would be quadratic in a text naming hundreds of things."""
    pieces: list[str] = []
    done = 0
    for start, end in spans:
        pieces += (text[done:start], " " * (end - start))
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


# Larger than any field's range, so that the field's clamp (and its note) applies; a
# number of 309 digits or more would otherwise be infinity, which no week count rounds.
_LARGEST = 1e9


def _number(value: str) -> float:
    return 1.0 if value in ("a", "an") else max(min(float(value), _LARGEST), -_LARGEST)


def _weeks(amount: float, unit: str) -> int:
    unit = unit.rstrip("s")
    if unit == "day":
        return math.ceil(amount / 7)
    if unit in ("month", "mo"):
        return round(amount * 52 / 12)
    if unit == "quarter":
        return round(amount * 13)
    if unit in ("year", "yr"):
        return round(amount * 52)
    if unit == "fortnight":
        return round(amount * 2)
    return round(amount)


def _clause_words(text: str, start: int, end: int) -> tuple[list[str], list[str]]:
    """The words of the clause around ``text[start:end]``: before (nearest first), after."""
    before_text = text[max(0, start - _WINDOW) : start]
    breaks = list(_CLAUSE_BREAK.finditer(before_text))
    if breaks:
        before_text = before_text[breaks[-1].end() :]
    after_text = text[end : end + _WINDOW]
    first_break = _CLAUSE_BREAK.search(after_text)
    if first_break is not None:
        after_text = after_text[: first_break.start()]
    before = _WORD_RE.findall(before_text)[::-1][:8]
    after = _WORD_RE.findall(after_text)[:5]
    return before, after


def _price_direction(before: list[str], after: list[str], signed: bool) -> int:
    """-1 cheaper, +1 dearer, 0 not a price change (or no direction)."""
    priced = any(word in _PRICE_WORDS for word in before + after)
    candidates: list[tuple[int, int]] = []  # (distance, direction)
    for distance, word in [*enumerate(after), *enumerate(before)]:
        if word in _DOWN_ALWAYS:
            candidates.append((distance, -1))
        elif priced and word in _DOWN:
            candidates.append((distance, -1))
        elif priced and word in _UP:
            candidates.append((distance, 1))
    if candidates:
        return min(candidates)[1]
    if signed and priced:
        return 2  # the sign of the number itself says it
    return 0


def _extract_price(text: str, notes: list[str]) -> tuple[str, float | None, bool]:
    """The price change in percent, from the first percentage that reads as one."""
    found: float | None = None
    implies_promotion = False
    for match in list(_PERCENT_RE.finditer(text))[:_MAX_PERCENTAGES]:
        raw = match.group(1)
        before, after = _clause_words(text, match.start(), match.end())
        direction = _price_direction(before, after, raw[0] in "+-")
        if direction == 0:
            if any(word in _PRICE_WORDS for word in before + after):
                notes.append(f"'{match.group(0).strip()}' names no direction; price unchanged")
            continue
        value = abs(_number(raw))
        if direction == 2:
            signed_value = _number(raw)
        else:
            signed_value = value * direction
        if found is None:
            found = signed_value
            implies_promotion = any(w in _DOWN_ALWAYS and w != "markdown" for w in before + after)
            text = _blank(text, match.start(), match.end())
        elif signed_value != found:
            notes.append(
                f"more than one price change given; used the first ({found:+g} %), "
                f"ignored {signed_value:+g} %"
            )
    if found is None and (half := _HALF_PRICE_RE.search(text)) is not None:
        found = -50.0
        implies_promotion = True
        text = _blank(text, half.start(), half.end())
    return text, found, implies_promotion


def _extract_horizon(text: str, notes: list[str]) -> tuple[str, int | None]:
    pattern, weeks, label = _HORIZON_WORDS[0]  # "half a year" before "a year" can match
    if (half := pattern.search(text)) is not None:
        notes.append(f"read '{half.group(0).strip()}' as {label}: {weeks} weeks")
        return _blank(text, half.start(), half.end()), weeks
    matches = list(_HORIZON_RE.finditer(text))
    if matches:
        preferred = [m for m in matches if m.group("lead")]
        match = (preferred or matches)[0]
        weeks = _weeks(_number(match.group("n")), match.group("unit"))
        if match.group("unit").rstrip("s") not in ("week", "wk"):
            notes.append(f"read '{match.group(0).strip()}' as {weeks} weeks")
        return _blank(text, match.start(), match.end()), weeks
    for pattern, weeks, label in _HORIZON_WORDS:
        if (word := pattern.search(text)) is not None:
            notes.append(f"read '{word.group(0).strip()}' as {label}: {weeks} weeks")
            return _blank(text, word.start(), word.end()), weeks
    return text, None


def _extract_category(text: str, notes: list[str]) -> tuple[str, str | None]:
    hits: list[tuple[int, int, str]] = []
    for category, pattern in _CATEGORY_RE:
        hits.extend((m.start(), -(m.end() - m.start()), category) for m in pattern.finditer(text))
    hits.sort()
    chosen: list[tuple[int, int, str]] = []
    covered_to = -1
    for start, negative_length, category in hits:
        if start >= covered_to:
            chosen.append((start, negative_length, category))
            covered_to = start - negative_length
    if not chosen:
        return text, None
    categories = list(dict.fromkeys(category for _, _, category in chosen))
    text = _blank_all(
        text, [(start, start - negative_length) for start, negative_length, _ in chosen]
    )
    if "all" in categories:
        return text, "all"
    if len(categories) > 1:
        others = ", ".join(CATEGORY_NAMES[c] for c in categories[1:])
        notes.append(
            f"several categories named; forecasting {CATEGORY_NAMES[categories[0]]} "
            f"(also named: {others}; say 'all categories' to forecast everything)"
        )
    return text, categories[0]


def extract_rules(text: str) -> RuleExtraction:
    """Read ``text`` with the rules; return the parameters and notes on what was assumed."""
    notes: list[str] = []
    work = _normalize(text)
    values: dict[str, Any] = {}

    if (match := _SERVICE_RE.search(work)) is not None:
        level = _number(match.group(1) or match.group(2))
        level = level / 100 if level > 1 else level
        if 0.5 <= level <= 0.999:
            values["service_level"] = level
        else:
            notes.append(f"service level {match.group(0).strip()!r} out of range; used 95 %")
        work = _blank(work, match.start(), match.end())

    if (match := _LEAD_TIME_RE.search(work)) is not None:
        amount = _number(match.group(1) or match.group(3))
        unit = match.group(2) or match.group(4)
        values["lead_time_weeks"] = min(max(_weeks(amount, unit), 1), 26)
        work = _blank(work, match.start(), match.end())

    work, price, price_implies_promotion = _extract_price(work, notes)
    if price is not None:
        if not -50 <= price <= 50:
            notes.append(f"price change {price:+g} % limited to +-50 %")
            price = max(-50.0, min(50.0, price))
        values["price_change_pct"] = price

    work, horizon = _extract_horizon(work, notes)
    if horizon is None:
        notes.append(f"no horizon given; used {DEFAULT_HORIZON_WEEKS} weeks")
    else:
        if not 1 <= horizon <= 52:
            notes.append(f"horizon of {horizon} weeks limited to 1-52")
        values["horizon_weeks"] = min(max(horizon, 1), 52)

    # The category before the channel: it consumes "store-wide", which is not the store channel.
    work, category = _extract_category(work, notes)
    if category is None:
        notes.append("no product category recognised; forecasting all categories")
    else:
        values["product_category"] = category

    if (negation := _PROMO_NEGATION_RE.search(work)) is not None:
        values["promotion"] = False
        work = _blank(work, negation.start(), negation.end())
    elif price_implies_promotion or _BOGO_RE.search(work) or _PROMO_RE.search(work):
        values["promotion"] = True

    if _ALL_CHANNELS_RE.search(work):
        values["channel"] = "all"
    else:
        online_hits = list(_ONLINE_RE.finditer(work))
        work = _blank_all(work, [hit.span() for hit in online_hits])  # "web shop" is not a shop
        online = bool(online_hits)
        store = _STORE_RE.search(work) is not None
        if online != store:
            values["channel"] = "online" if online else "store"

    return RuleExtraction(ForecastParameters(**values), notes)


def extract_rule_based(text: str) -> ForecastParameters:
    """Strategy text to parameters with the rules only (a pure function)."""
    return extract_rules(text).parameters
