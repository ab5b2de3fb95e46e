"""Shared fixtures: a real server on a real port, and helpers to publish into it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.config import Settings
from server.context import STREAM_CONTEXT
from server.hub import Hub
from tests.timing import HEARTBEAT_INTERVAL


@pytest.fixture
def settings() -> Settings:
    """Test settings: fast heartbeats, small limits. Override per test with ``settings.replace``."""
    return Settings(
        port=0,
        heartbeat_interval=HEARTBEAT_INTERVAL * 50,  # quiet by default; tests opt in
        buffer_size=200,
        session_ttl=60.0,
        subscriber_queue_size=100,
        max_frame_size=4096,
        max_body_size=64 * 1024,
        agent_timeout=60.0,
        # A workflow still running when a test ends is interrupted at once, not given the
        # production grace period (tests/hardening/test_shutdown.py covers the grace).
        shutdown_grace=0.0,
    )


ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def make_server(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> ServerFactory:
    """Start the real app on 127.0.0.1 with the given settings (aiohttp's TestServer binds a
    real socket and cancels handlers on disconnect, like ``python -m server``)."""

    async def factory(settings: Settings) -> TestServer:
        return await aiohttp_server(create_app(settings))

    return factory


@pytest.fixture
async def server(make_server: ServerFactory, settings: Settings) -> TestServer:
    return await make_server(settings)


@pytest.fixture
async def client(
    server: TestServer, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> TestClient:
    return await aiohttp_client(server)


def hub_of(server: TestServer) -> Hub:
    app: web.Application = server.app
    return app[STREAM_CONTEXT].hub


@pytest.fixture
async def hub(server: TestServer) -> AsyncIterator[Hub]:
    yield hub_of(server)


# --- transport, API and end-to-end tests ------------------------------------------------------

ClientFactory = Callable[[Settings], Awaitable[TestClient]]


@pytest.fixture
async def make_client(
    make_server: ServerFactory, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> ClientFactory:
    """Start the real app with the given settings; an aiohttp test client of it
    (``client.server`` is the server, ``client.session`` a plain ``ClientSession``)."""

    async def factory(settings: Settings) -> TestClient:
        return await aiohttp_client(await make_server(settings))

    return factory
