"""Shared fixtures: a real server on a real port, helpers to publish into it, and the
Redis that the tests of both brokers use.

**Both brokers.** ``settings`` builds the app on the broker ``broker_kind`` names:
``"memory"`` by default. A test module or directory runs on both by overriding
``broker_kind`` with :data:`BOTH_BROKERS` (``pytestmark`` of a module, or a fixture in a
``conftest.py``); every test there then runs once per broker, with the same code. On
``"redis"`` the app talks to the shared test ``redis-server`` under a key prefix of its own.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import BaseTestServer

from server.app import create_app
from server.config import Settings
from server.context import STREAM_CONTEXT
from server.hub import Hub
from tests.clients import AppClient, app_of
from tests.redis_support import RedisServer, redis_unavailable
from tests.redis_support import ServerFactory as RedisFactory
from tests.timing import HEARTBEAT_INTERVAL

BROKERS = ("memory", "redis")
BOTH_BROKERS = pytest.mark.parametrize("broker_kind", BROKERS)
"""Runs every test it marks once per broker: ``pytestmark = BOTH_BROKERS`` in a module."""


# --- Redis --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis shared by the tests that never stop it (each uses keys of its own)."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        redis_unavailable("no redis-server binary on PATH and REDIS_URL is not set")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis-shared"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisFactory]:
    """Start dedicated ``redis-server``s that the test may stop and restart."""
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL points at a server this test cannot stop and restart")
    binary = shutil.which("redis-server")
    if binary is None:
        redis_unavailable("no redis-server binary on PATH to stop and restart")
    servers: list[RedisServer] = []

    def make(password: str | None = None, tls: bool = False) -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = RedisServer(binary, directory, password, tls)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


# --- the app ------------------------------------------------------------------------------------


@pytest.fixture
def broker_kind() -> str:
    """The broker of the app under test; overridden with both brokers where that matters."""
    return "memory"


@pytest.fixture
def settings(broker_kind: str, request: pytest.FixtureRequest) -> Settings:
    """Test settings: fast heartbeats, small limits, the broker ``broker_kind`` names.
    Override per test with ``settings.replace``."""
    if broker_kind == "redis":
        broker = {
            "broker": "redis",
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_key_prefix": f"test-{secrets.token_hex(4)}",
        }
    else:
        assert broker_kind == "memory", broker_kind
        broker = {"broker": "memory"}
    return Settings(
        **broker,
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


ServerFactory = Callable[..., Awaitable[BaseTestServer]]


@pytest.fixture
async def make_server(aiohttp_server: Callable[..., Awaitable[BaseTestServer]]) -> ServerFactory:
    """Start the real app on 127.0.0.1 with the given settings (aiohttp's TestServer binds a
    real socket and cancels handlers on disconnect, like ``python -m server``)."""

    async def factory(settings: Settings) -> BaseTestServer:
        return await aiohttp_server(create_app(settings))

    return factory


@pytest.fixture
async def server(make_server: ServerFactory, settings: Settings) -> BaseTestServer:
    return await make_server(settings)


@pytest.fixture
async def client(
    server: BaseTestServer, aiohttp_client: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    return await aiohttp_client(server)


def hub_of(server: BaseTestServer) -> Hub:
    app = app_of(server)
    return app[STREAM_CONTEXT].hub


@pytest.fixture
async def hub(server: BaseTestServer) -> AsyncIterator[Hub]:
    yield hub_of(server)


# --- transport, API and end-to-end tests ------------------------------------------------------

ClientFactory = Callable[[Settings], Awaitable[AppClient]]


@pytest.fixture
async def make_client(
    make_server: ServerFactory, aiohttp_client: Callable[..., Awaitable[AppClient]]
) -> ClientFactory:
    """Start the real app with the given settings; an aiohttp test client of it
    (``client.server`` is the server, ``client.session`` a plain ``ClientSession``)."""

    async def factory(settings: Settings) -> AppClient:
        return await aiohttp_client(await make_server(settings))

    return factory
