"""Test support for the Redis broker: a recorder standing in for the hub, and wrappers of
a call to Redis that count its calls or lose its answers. The
``redis-server`` the tests control is in :mod:`tests.redis_support`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import ConnectionError as RedisConnectionError

from server.brokers.redis import RedisBroker
from server.messages import StoredEvent
from tests.redis_support import RedisServer, ServerFactory, redis_unavailable

__all__ = [
    "TIMEOUT",
    "FreezingProxy",
    "Node",
    "NodeFactory",
    "Recorder",
    "RedisServer",
    "ServerFactory",
    "body",
    "eventually",
    "new_session_id",
    "redis_command",
    "redis_unavailable",
]

TIMEOUT = 5.0  # seconds any awaited condition may take before the test fails


def body(n: int, **extra: Any) -> str:
    """A progress event's JSON body, numbered ``n``."""
    return json.dumps({"type": "progress", "n": n, **extra}, separators=(",", ":"))


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


async def redis_command(redis: Any, *args: Any) -> Any:
    """A command redis-py has no typed method for (``CLIENT PAUSE``, ``ACL SETUSER``)."""
    return await redis.execute_command(*args)


@contextlib.asynccontextmanager
async def out_of_memory(redis: Any) -> AsyncIterator[None]:
    """Inside the block Redis refuses every command that would write (``noeviction`` and a
    ``maxmemory`` of one byte), as a full Redis does."""
    await redis_command(redis, "CONFIG", "SET", "maxmemory-policy", "noeviction")
    await redis_command(redis, "CONFIG", "SET", "maxmemory", "1")
    try:
        yield
    finally:
        await redis_command(redis, "CONFIG", "SET", "maxmemory", "0")


async def snapshot(redis: Any, keys: list[str]) -> Callable[[], Awaitable[None]]:
    """Take ``keys`` as they are now; the function returned puts them back so, losing
    what was written since, as a Redis that came back from an older snapshot, without
    breaking any connection to it."""
    dumped = [await redis.dump(key) for key in keys]

    async def restore() -> None:
        for key, value in zip(keys, dumped, strict=True):
            assert value is not None, key
            await redis.restore(key, 60_000, value, replace=True)

    return restore


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


@dataclass
class FreezingProxy:
    """A TCP proxy in front of Redis whose open connections can be frozen: they stay open
    and carry nothing more either way, as over a network path that died without a reset
    (a half-open connection). Connections opened afterwards work. Or cut: every connection
    is reset, and new ones too until :meth:`restore` (Redis unreachable from behind it)."""

    target: tuple[str, int]
    server: asyncio.Server | None = None
    links: list[asyncio.Task[None]] = field(default_factory=list)
    held: list[asyncio.StreamWriter] = field(default_factory=list)  # frozen, kept open
    refusing: bool = False

    @classmethod
    async def start(cls, redis_url: str) -> FreezingProxy:
        parts = urlsplit(redis_url)
        proxy = cls((parts.hostname or "127.0.0.1", parts.port or 6379))
        proxy.server = await asyncio.start_server(proxy._link, "127.0.0.1", 0)
        return proxy

    def url(self, redis_url: str) -> str:
        """``redis_url`` with its host and port replaced by the proxy's."""
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        parts = urlsplit(redis_url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.held += [writer, up_writer]
        self.links += [
            asyncio.create_task(self._copy(reader, up_writer)),
            asyncio.create_task(self._copy(up_reader, writer)),
        ]

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def freeze(self) -> None:
        """Stop carrying data on every connection open now; keep their sockets open."""
        links, self.links = self.links, []
        for task in links:
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)

    async def cut(self) -> None:
        """Reset every connection, and every new one until :meth:`restore`."""
        self.refusing = True
        await self.freeze()
        held, self.held = self.held, []
        for writer in held:
            writer.transport.abort()

    def restore(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        await self.freeze()
        for writer in self.held:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class CountCalls:
    """Wrap a call to Redis and count its calls, retries included."""

    def __init__(self, call: Callable[..., Awaitable[Any]]) -> None:
        self.call = call
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.call(*args, **kwargs)


class LoseFirstAnswer(CountCalls):
    """Wrap a call to Redis so that its first ``lost`` calls run in Redis but their answers
    are "lost", each after ``meanwhile()`` (what else reaches Redis before the retry)."""

    def __init__(
        self,
        call: Callable[..., Awaitable[Any]],
        lost: int = 1,
        meanwhile: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        super().__init__(call)
        self.lost = lost
        self.meanwhile = meanwhile

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        this_call = self.calls + 1  # several may be on their way at once
        result = await super().__call__(*args, **kwargs)
        if this_call <= self.lost:
            if self.meanwhile is not None:
                await self.meanwhile()
            raise RedisConnectionError("connection lost before the reply")
        return result
