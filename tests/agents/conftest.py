"""Fixtures of the agent tests: a recording reporter, and one forecast process pool."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from server.agents.fit_pool import ForecastExecutor


@dataclass
class Report:
    status: str
    progress: int
    data: dict[str, Any]


@dataclass
class Recorder:
    """A reporter (the ``report`` an agent is handed) that keeps what it was told."""

    reports: list[Report] = field(default_factory=list)

    async def __call__(
        self, status: str, progress: int, data: Mapping[str, Any] | None = None
    ) -> None:
        assert 0 <= progress <= 100
        self.reports.append(Report(status, progress, dict(data or {})))

    @property
    def statuses(self) -> list[str]:
        return [r.status for r in self.reports]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="session")
def forecast_executor() -> Iterator[ForecastExecutor]:
    """One process pool for the whole session: workers are spawned (and import statsmodels)
    once, not once per test."""
    executor = ForecastExecutor(max_workers=2)
    yield executor
    asyncio.run(executor.close())
