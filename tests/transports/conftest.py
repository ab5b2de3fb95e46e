"""Each transport test runs once per independent client: aiohttp's WebSocket client and the
``websockets`` library; a raw SSE parse over aiohttp and ``curl -N``; and once per broker
(in-memory, Redis)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from urllib.parse import quote

import aiohttp_sse
import pytest
from aiohttp import ClientSession, web_protocol
from aiohttp.test_utils import BaseTestServer

import server
from tests.clients import (
    AppClient,
    SSEStream,
    WSClient,
    http_url,
    open_aiohttp_sse,
    open_aiohttp_ws,
    open_curl_sse,
    open_websockets_ws,
    wait_until,
    ws_url,
)
from tests.conftest import BROKERS, hub_of

WSOpener = Callable[[BaseTestServer, str], AbstractAsyncContextManager[WSClient]]
SSEOpener = Callable[..., AbstractAsyncContextManager[SSEStream]]


def ws_path(session_id: str, last_event_id: str | None = None) -> str:
    return _stream_path("ws", session_id, last_event_id)


def sse_path(session_id: str, last_event_id: str | None = None) -> str:
    return _stream_path("sse", session_id, last_event_id)


def _stream_path(transport: str, session_id: str, last_event_id: str | None) -> str:
    path = f"/{transport}/orchestrator/{session_id}"
    if last_event_id is not None:
        path += "?last_event_id=" + quote(last_event_id, safe="")
    return path


SERVER_CODE = Path(server.__file__).parent
AIOHTTP_SSE_CODE = Path(aiohttp_sse.__file__).parent
# aiohttp's server side: a connection's task and its request handler's.
AIOHTTP_SERVER_CODE = Path(web_protocol.__file__)


def live_tasks(*roots: Path) -> int:
    """Task objects whose coroutine is code under one of ``roots`` that are still alive,
    running or finished: a finished task that is still referenced holds its coroutine and
    memory too. The server runs in this process and loop."""
    gc.collect()  # not those only a reference cycle keeps until the next collection
    tasks = (obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task))
    codes = (getattr(task.get_coro(), "cr_code", None) for task in tasks)
    return sum(
        1
        for code in codes
        if code is not None and any(Path(code.co_filename).is_relative_to(r) for r in roots)
    )


def aiohttp_holds_no_more(client: AppClient) -> Callable[[], bool]:
    """A check that aiohttp counts no more connections, and holds no more tasks, than it
    does now: streams opened after this call are no longer aiohttp's once it is true."""
    assert client.server.runner is not None and client.server.runner.server is not None
    connections = client.server.runner.server.connections
    before = len(connections), live_tasks(AIOHTTP_SERVER_CODE)
    return lambda: (len(connections), live_tasks(AIOHTTP_SERVER_CODE)) <= before


async def subscribed(client: AppClient, count: int = 1) -> None:
    """Wait until the hub holds ``count`` subscriptions (the clients are live)."""
    hub = hub_of(client.server)
    await wait_until(lambda: hub.subscriber_count == count, f"{count} subscription(s)")


@pytest.fixture(params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Every transport test runs on the in-memory broker and on Redis."""
    kind: str = request.param
    return kind


@pytest.fixture(params=["aiohttp", "websockets"])
async def open_ws(request: pytest.FixtureRequest) -> AsyncIterator[WSOpener]:
    """``open_ws(server, path)``: a WebSocket connection through one of two client libraries."""
    if request.param == "websockets":
        yield lambda server, path: open_websockets_ws(ws_url(server, path))
        return
    async with ClientSession() as session:
        yield lambda server, path: open_aiohttp_ws(session, ws_url(server, path))


@pytest.fixture(params=["aiohttp", "curl", "curl-http1.0"])
async def open_sse(request: pytest.FixtureRequest) -> AsyncIterator[SSEOpener]:
    """``open_sse(server, path, headers=None)``: an SSE response read by aiohttp, by curl -N,
    or by curl -N speaking HTTP/1.0 (no chunked encoding: what nginx sends upstream unless
    told otherwise)."""
    if request.param.startswith("curl"):
        extra_args = ("--http1.0",) if request.param == "curl-http1.0" else ()

        def curl(
            server: BaseTestServer, path: str, headers: Mapping[str, str] | None = None
        ) -> AbstractAsyncContextManager[SSEStream]:
            return open_curl_sse(http_url(server, path), headers, extra_args=extra_args)

        yield curl
        return
    async with ClientSession() as session:

        def aiohttp(
            server: BaseTestServer, path: str, headers: Mapping[str, str] | None = None
        ) -> AbstractAsyncContextManager[SSEStream]:
            return open_aiohttp_sse(session, http_url(server, path), headers)

        yield aiohttp
