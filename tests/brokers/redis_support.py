"""Test support for the Redis broker: a recorder standing in for the hub. The
``redis-server`` the tests control is in :mod:`tests.redis_support`."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from server.brokers.redis import RedisBroker
from server.messages import StoredEvent
from tests.redis_support import RedisServer, ServerFactory, redis_unavailable

__all__ = [
    "TIMEOUT",
    "Node",
    "NodeFactory",
    "Recorder",
    "RedisServer",
    "ServerFactory",
    "eventually",
    "new_session_id",
    "redis_unavailable",
]

TIMEOUT = 5.0  # seconds any awaited condition may take before the test fails


def new_session_id() -> str:
    return f"s-{secrets.token_hex(8)}"


class Recorder:
    """The hub's stand-in: records what a broker delivers, and waits for conditions."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: StoredEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, session_id: str) -> list[StoredEvent]:
        return [e for e in self.events if e.session_id == session_id]

    def seqs(self, session_id: str) -> list[int]:
        return [e.seq for e in self.of(session_id)]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Node:
    """One broker as one server process would hold it, with what it delivered."""

    broker: RedisBroker
    recorder: Recorder


class NodeFactory(Protocol):
    """The ``make_node`` fixture: a started broker ("process") with its recorder."""

    async def __call__(self, url: str | None = None, **options: Any) -> Node: ...


async def eventually(check: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Poll a condition that announces nothing (a key expiring, a server coming back)
    until it holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
