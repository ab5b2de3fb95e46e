"""Fixtures of the hardening tests: the real app, with fake agents, on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import BaseTestServer

from server.app import create_app
from server.config import Settings
from tests.hardening.support import FakeAgents

StartServer = Callable[..., Awaitable[BaseTestServer]]


@pytest.fixture
def agents() -> FakeAgents:
    return FakeAgents()


@pytest.fixture
async def start(
    aiohttp_server: Callable[..., Awaitable[BaseTestServer]], settings: Settings, agents: FakeAgents
) -> StartServer:
    """Start the real app with fake agents and ``settings`` changed by keyword arguments."""

    async def factory(**changes: Any) -> BaseTestServer:
        changed = settings.replace(**{"shutdown_grace": 0.0, **changes})
        return await aiohttp_server(create_app(changed, agents=agents))

    return factory


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session
