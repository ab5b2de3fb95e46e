"""Test support: the real server in-process on a real port (for the browser and contract
tests), a broker that can pause a workflow, and the page's error log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from server.app import create_app
from server.brokers.base import Broker, IdempotencyKey
from server.brokers.memory import MemoryBroker
from server.config import Settings
from server.context import STREAM_CONTEXT
from server.hub import Hub
from server.messages import StoredEvent

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refuse_websocket_upgrades(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What a proxy that does not pass WebSockets does: answer the handshake with 502."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return web.Response(status=502, text="no websockets here")
    return await handler(request)


@dataclass(frozen=True, slots=True)
class LiveServer:
    app: web.Application
    url: str  # http://127.0.0.1:<port>

    @property
    def hub(self) -> Hub:
        return self.app[STREAM_CONTEXT].hub

    def ws_url(self, path: str) -> str:
        return "ws" + self.url.removeprefix("http") + path


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings,
    *,
    broker: Broker | None = None,
    middlewares: Sequence[Middleware] = (),
) -> AsyncIterator[LiveServer]:
    """``create_app`` behind ``AppRunner`` + ``TCPSite`` on 127.0.0.1:0, cancelling handlers
    on disconnect like ``python -m server``; shut down (streams closed 1001) on exit.
    ``middlewares`` go in front of the app's own (to play a proxy in the way)."""
    app = create_app(settings, broker=broker)
    for middleware in middlewares:
        app.middlewares.insert(0, middleware)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield LiveServer(app, f"http://{host}:{port}")
    finally:
        await runner.cleanup()


class PausingBroker(MemoryBroker):
    """The in-memory broker, able to hold the publisher right after one chosen event is stored
    (and delivered): the workflow waits there until the test calls :meth:`resume`. A test
    hook at the broker boundary: subscribers see nothing different."""

    def __init__(
        self, settings: Settings, pause_after: Callable[[dict[str, object]], bool]
    ) -> None:
        super().__init__(settings.buffer_size, settings.session_ttl)
        self._pause_after = pause_after
        self.paused = asyncio.Event()
        self._resume = asyncio.Event()

    async def append(
        self,
        session_id: str,
        type: str,
        body: str,
        final: bool,
        key: IdempotencyKey | None = None,
    ) -> StoredEvent:
        stored = await super().append(session_id, type, body, final, key)
        if not self.paused.is_set() and self._pause_after(json.loads(body)):
            self.paused.set()
            await self._resume.wait()
        return stored

    def resume(self) -> None:
        self._resume.set()

    async def close(self) -> None:
        self._resume.set()  # never leave a workflow hanging
        await super().close()


class PageProblems:
    """Uncaught errors and console errors of the page; a test may allow expected ones."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._allowed: list[re.Pattern[str]] = []

    def allow(self, pattern: str) -> None:
        self._allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [p for p in self.seen if not any(a.search(p) for a in self._allowed)]
