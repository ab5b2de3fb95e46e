"""The ``cluster`` fixture: real server processes on one Redis (see support.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest
from aiohttp import ClientSession

from tests.multiprocess.support import ServerProcess

Cluster = Callable[..., Awaitable[list[ServerProcess]]]


@pytest.fixture
async def cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """``await cluster("a", "b", "c")``: start those processes at once (each
    ``python -m server --broker redis`` on a free port, all on the test Redis under a key
    prefix of this test's own) and return them once every one answers ``/readyz``;
    ``env=`` adds environment variables to theirs. Every process, and every worker of
    theirs, is ended at teardown."""
    prefix = f"test-{secrets.token_hex(4)}"
    started: list[ServerProcess] = []

    async def start(*names: str, env: Mapping[str, str] | None = None) -> list[ServerProcess]:
        servers = [ServerProcess(name, redis_url, prefix, tmp_path, env) for name in names]
        started.extend(servers)
        for server in servers:
            await server.start()
        async with ClientSession() as http:
            await asyncio.gather(*(server.wait_ready(http) for server in servers))
        return servers

    try:
        yield start
    finally:
        await asyncio.gather(*(server.stop() for server in started))
