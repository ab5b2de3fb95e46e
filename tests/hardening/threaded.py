"""The real app served by its own event loop in a thread, for synchronous clients.

Hypothesis drives plain functions, so the fuzz tests talk to the server with blocking
clients (``http.client``, ``websockets.sync``) while the server runs here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from server.context import STREAM_CONTEXT, StreamContext

T = TypeVar("T")
START_TIMEOUT = 10.0


class ThreadedServer:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="threaded-server", daemon=True)

    @property
    def ctx(self) -> StreamContext:
        return self.app[STREAM_CONTEXT]

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the threaded server did not start")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT)

    def call(self, function: Callable[[], Awaitable[T]], timeout: float = START_TIMEOUT) -> T:
        """Run a coroutine function on the server's loop and return its result."""

        async def run() -> T:
            return await function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()
