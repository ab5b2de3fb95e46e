"""Fixtures for the broker tests: brokers wired to recorders. The Redis they use
(``redis_url``, ``own_redis``) comes from ``tests/conftest.py`` (see
:mod:`tests.redis_support`)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from server.brokers.redis import RedisBroker

from .redis_support import Node, NodeFactory, Recorder


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
