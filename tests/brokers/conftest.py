"""Fixtures for the broker tests: a real Redis, and brokers wired to recorders.

Where Redis comes from:

* ``REDIS_URL`` set: that server (tests that stop and restart Redis are skipped,
  since they cannot stop a server they did not start);
* else a ``redis-server`` binary on ``PATH``: the tests start their own on a
  free port in a temporary directory, without persistence;
* else the Redis tests are skipped, unless ``REQUIRE_REDIS=1`` (CI), which
  turns that skip into a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from server.brokers.redis import RedisBroker

from .redis_support import (
    Node,
    NodeFactory,
    Recorder,
    RedisServer,
    ServerFactory,
    redis_unavailable,
)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis shared by the tests that never stop it."""
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
def own_redis(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start dedicated ``redis-server``s that the test may stop and restart."""
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL points at a server this test cannot stop and restart")
    binary = shutil.which("redis-server")
    if binary is None:
        redis_unavailable("no redis-server binary on PATH to stop and restart")
    servers: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = RedisServer(binary, directory, password)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
async def make_node(redis_url: str) -> AsyncIterator[NodeFactory]:
    """Build started brokers ("processes") that share one key prefix, unique to the test."""
    prefix = f"test-{secrets.token_hex(4)}"
    nodes: list[Node] = []

    async def make(url: str | None = None, **options: Any) -> Node:
        options.setdefault("buffer_size", 1000)
        options.setdefault("session_ttl", 120.0)
        options.setdefault("key_prefix", prefix)
        broker = RedisBroker(url or redis_url, **options)
        recorder = Recorder()
        await broker.start(recorder)
        node = Node(broker, recorder)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.broker.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client, to look at keys the way an operator would."""
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
