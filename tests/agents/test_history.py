"""The shipped sales history: made by the generator, shaped as documented, effects recoverable."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from server.agents.history import data_dir, load_history
from server.agents.parameters import CATEGORIES

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "generate_sales_history.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_sales_history", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_shipped_files_are_what_the_generator_makes(generator: ModuleType) -> None:
    """`generate_sales_history.py --check` passes: the data is reproducible from its seed."""
    assert generator.main(["--check", "--out-dir", str(data_dir())]) == 0


def test_shape_of_the_history() -> None:
    """156 consecutive Mondays, 5 categories of 3+ products, two channels, real prices."""
    history = load_history()
    weeks = history.weeks
    assert len(weeks) == 156
    assert all(w.weekday() == 0 for w in weeks)
    assert all(b - a == timedelta(weeks=1) for a, b in itertools.pairwise(weeks))
    for category in CATEGORIES:
        products = history.select(category)  # type: ignore[arg-type]
        assert len(products) >= 3
        for product in products:
            assert product.online.min() >= 0 and product.store.min() >= 0
            assert product.online.sum() > 0 and product.store.sum() > 0
            assert product.info.unit_cost < product.info.list_price
            assert len(np.unique(product.price)) > 3  # list-price steps, promotions, tests
            assert product.info.list_price == product.list_price[-1]
    assert len(history.select("all")) == 20


def test_seasonality_and_trend_are_in_the_data() -> None:
    """Outdoor furniture sells far more in June than in January, heating the other way round;
    and the whole range sells more in 2025 than in 2023, in spite of higher list prices."""
    history = load_history()
    units = np.sum([p.units("all") for p in history.select("outdoor_furniture")], axis=0)
    months = np.array([w.month for w in history.weeks])
    years = np.array([w.year for w in history.weeks])
    assert units[months == 6].mean() > 3 * units[months == 1].mean()
    everything = np.sum([p.units("all") for p in history.select("all")], axis=0)
    assert everything[years == 2025].sum() > 1.08 * everything[years == 2023].sum()
    heat = np.sum([p.units("all") for p in history.select("heating")], axis=0)
    assert heat[months == 12].mean() > 3 * heat[months == 6].mean()


def test_estimated_effects_recover_the_generators_truth(generator: ModuleType) -> None:
    """The regression finds each category's elasticity (within 0.3) and uplift (within 0.1)."""
    history = load_history()
    for category in generator.CATALOG:
        effects = history.effects(category.slug)
        assert effects.elasticity == pytest.approx(category.elasticity, abs=0.3), category.slug
        assert effects.promotion_uplift == pytest.approx(category.promotion_uplift, abs=0.1)
