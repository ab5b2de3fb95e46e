"""Soak: 5,000 connect/disconnect cycles over both transports, half of them abrupt (the
TCP connection dropped with no close handshake). Afterwards no connection, subscription,
session, task or memory is left behind."""

from __future__ import annotations

import asyncio
import gc
import itertools

from aiohttp import ClientSession, TCPConnector, web
from aiohttp.test_utils import BaseTestServer

from server.messages import ProgressEvent
from tests.hardening.clients import sse_url, ws_url
from tests.hardening.conftest import StartServer
from tests.hardening.support import (
    RawConnection,
    context_of,
    metric,
    new_session_id,
    open_connections,
    rss_bytes,
    wait_until,
)
from tests.timing import EVENT_TIMEOUT

CYCLES = 5_000
WARM_UP = 500  # fills allocator arenas and caches before the baseline is taken
CONCURRENCY = 50
SESSIONS = 20
RSS_GROWTH_BOUND = 5 * 1024 * 1024
SETTLE_TIMEOUT = 30.0


async def ws_graceful(http: ClientSession, server: BaseTestServer, session_id: str) -> None:
    async with http.ws_connect(ws_url(server, session_id)) as ws:
        # Heartbeats may come first (PROTOCOL.md: at any time); then the first replayed event.
        event = (await ws.receive(timeout=EVENT_TIMEOUT)).json()
        while event["type"] == "heartbeat":
            event = (await ws.receive(timeout=EVENT_TIMEOUT)).json()
        assert event.get("seq") == 1, event


async def ws_abrupt(http: ClientSession, server: BaseTestServer, session_id: str) -> None:
    raw = await RawConnection.open(server)
    try:
        assert await raw.websocket(f"/ws/orchestrator/{session_id}") == 101
    finally:
        raw.abort()


async def sse_graceful(http: ClientSession, server: BaseTestServer, session_id: str) -> None:
    async with http.get(sse_url(server, session_id)) as response:
        assert await response.content.readline() == b"retry: 2000\n"
        response.close()


async def sse_abrupt(http: ClientSession, server: BaseTestServer, session_id: str) -> None:
    raw = await RawConnection.open(server)
    try:
        head = await raw.request_head(f"/sse/orchestrator/{session_id}")
        assert head["status"] == 200
    finally:
        raw.abort()


KINDS = (ws_graceful, ws_abrupt, sse_graceful, sse_abrupt)


async def run_cycles(
    http: ClientSession, server: BaseTestServer, sessions: list[str], count: int
) -> None:
    plan = zip(range(count), itertools.cycle(KINDS), itertools.cycle(sessions), strict=False)
    pending: set[asyncio.Task[None]] = set()
    for _, kind, session_id in plan:
        if len(pending) >= CONCURRENCY:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        pending.add(asyncio.create_task(kind(http, server, session_id)))
    for finished in asyncio.as_completed(pending):
        await finished


async def test_5000_cycles_leave_no_connection_task_or_memory_behind(start: StartServer) -> None:
    """Connection gauge and sessions back to 0, asyncio tasks back to the baseline, RSS
    within 5 MB of it, after 5,000 cycles (half abrupt) on both transports."""
    server = await start(max_connections=CONCURRENCY * 4)
    ctx = context_of(server)
    sessions = [new_session_id() for _ in range(SESSIONS)]
    for session_id in sessions:
        for n in range(1, 4):
            await ctx.hub.publish(
                ProgressEvent(session_id=session_id, agent="demand", status=f"{n}", progress=n)
            )

    def state() -> dict[str, float]:
        return {
            "connections": open_connections(ctx),
            "subscribers": ctx.hub.subscriber_count,
            "live sessions": metric(ctx, "orchestrator_sessions", state="live"),
            "tasks": len(asyncio.all_tasks()),
        }

    async def settled() -> None:
        await wait_until(
            lambda: (
                open_connections(ctx) == 0
                and ctx.hub.subscriber_count == 0
                and metric(ctx, "orchestrator_sessions", state="live") == 0
            ),
            SETTLE_TIMEOUT,
            state,
        )

    connector = TCPConnector(limit=0, force_close=True)
    async with ClientSession(connector=connector) as http:
        await run_cycles(http, server, sessions, WARM_UP)
        await settled()
        gc.collect()
        tasks, rss = len(asyncio.all_tasks()), rss_bytes()

        await run_cycles(http, server, sessions, CYCLES)
        await settled()
        await wait_until(
            lambda: len(asyncio.all_tasks()) <= tasks,
            SETTLE_TIMEOUT,
            lambda: f"{state()}, baseline {tasks} tasks: {sorted(map(repr, asyncio.all_tasks()))}",
        )
        gc.collect()
        growth = rss_bytes() - rss
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MB"
    # An aborted WebSocket must not outlive its handler (aiohttp's heartbeat timer would
    # keep it, with its request and buffers, until the next heartbeat).
    assert not [o for o in gc.get_objects() if isinstance(o, web.StreamResponse)]
    assert metric(ctx, "orchestrator_refusals_total", reason="connections") == 0
    replays = metric(ctx, "orchestrator_replays_total")
    assert replays >= (WARM_UP + CYCLES) / 2  # at least every graceful cycle subscribed
