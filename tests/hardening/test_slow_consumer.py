"""A reader that stops reading while a burst is published: it is cut off by policy, server
memory stays bounded, and the other subscribers keep getting every event promptly."""

from __future__ import annotations

import asyncio
import gc
import time
from datetime import datetime

import pytest
from aiohttp import ClientSession, WSMsgType

from server.messages import CompleteEvent, ProgressEvent
from tests.hardening.clients import ws_url
from tests.hardening.conftest import StartServer
from tests.hardening.support import (
    RawConnection,
    context_of,
    metric,
    new_session_id,
    open_connections,
    rss_bytes,
    stalled_sse_client,
    wait_until,
)
from tests.timing import EVENT_TIMEOUT

BURST = 20_000
PADDING = "x" * 1900  # ~2 KB per event: the burst is ~40 MB, far more than any buffer
MEMORY_BOUND = 25 * 1024 * 1024
CUT_OFF_TIMEOUT = 30.0  # heartbeat_interval bounds a stuck write, then close time-outs


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_reader_that_stops_is_cut_off_and_memory_stays_bounded(
    start: StartServer, http: ClientSession, transport: str
) -> None:
    """The stalled reader is closed as ``slow_consumer`` (its queue is bounded); RSS grows by
    far less than the burst; a reader on the same session gets every event, each within
    EVENT_TIMEOUT of its publication."""
    server = await start(subscriber_queue_size=50, heartbeat_interval=1.0, buffer_size=100)
    ctx = context_of(server)
    session_id = new_session_id()

    slow = await RawConnection.open(server, receive_buffer=4096)
    if transport == "websocket":
        assert await slow.websocket(f"/ws/orchestrator/{session_id}") == 101
    else:
        head = await slow.request_head(f"/sse/orchestrator/{session_id}")
        assert head["status"] == 200

    worst_lag = 0.0
    received = 0

    async with http.ws_connect(ws_url(server, session_id), max_msg_size=0) as fast:

        async def read_fast() -> None:
            nonlocal worst_lag, received
            while received < BURST:
                message = await fast.receive(timeout=EVENT_TIMEOUT)
                assert message.type is WSMsgType.TEXT, message
                event = message.json()
                published = datetime.fromisoformat(event["timestamp"]).timestamp()
                worst_lag = max(worst_lag, time.time() - published)
                received += 1

        await wait_until(lambda: ctx.hub.subscriber_count == 2)
        gc.collect()
        baseline = rss_bytes()
        reader = asyncio.create_task(read_fast())
        peak = baseline
        for n in range(BURST):
            await ctx.hub.publish(
                ProgressEvent(
                    session_id=session_id, agent="demand", status=PADDING, progress=n % 101
                )
            )
            if n % 1000 == 0:
                peak = max(peak, rss_bytes())
            await asyncio.sleep(0)  # a publisher yields between events, as over HTTP
        await asyncio.wait_for(reader, EVENT_TIMEOUT)
        peak = max(peak, rss_bytes())

        assert received == BURST
        assert worst_lag < EVENT_TIMEOUT
        assert peak - baseline < MEMORY_BOUND, (peak - baseline) / 2**20
        assert metric(ctx, "orchestrator_subscriptions_closed_total", reason="slow_consumer") == 1
        await wait_until(lambda: open_connections(ctx) == 1, CUT_OFF_TIMEOUT)
    slow.abort()
    await wait_until(lambda: open_connections(ctx) == 0)


async def test_a_stalled_sse_reader_is_dropped_soon_after_the_final_event(
    start: StartServer,
) -> None:
    """The final event ends the response, but a client that has stopped reading cannot take
    its last bytes: its socket, and with it the stream's subscription and admission, is
    dropped a heartbeat interval later instead of staying open for as long as the client
    does."""
    server = await start(subscriber_queue_size=50, heartbeat_interval=1.0, buffer_size=100)
    ctx = context_of(server)
    session_id = new_session_id()
    async with stalled_sse_client(server, session_id, padding=PADDING, limit=BURST):
        await ctx.hub.publish(
            CompleteEvent(
                session_id=session_id,
                agent="orchestrator",
                status="Forecast ready",
                data={"result": {}},
                final=True,
            )
        )
        await wait_until(lambda: open_connections(ctx) == 0, CUT_OFF_TIMEOUT)
        await wait_until(lambda: ctx.hub.subscriber_count == 0)


async def test_a_stalled_reader_that_half_closes_is_dropped_within_a_heartbeat_interval(
    start: StartServer,
) -> None:
    """A client that has stopped reading, with bytes of its stream still in the server's
    buffer, then shuts its sending side (``shutdown(SHUT_WR)``) and keeps its socket
    open: the server closes the stream and, as the client takes nothing, drops it a
    heartbeat interval later, freeing its subscription and its admission; it is not held
    for as long as the client keeps its socket."""
    server = await start(subscriber_queue_size=50, heartbeat_interval=1.0, buffer_size=100)
    ctx = context_of(server)
    session_id = new_session_id()
    async with stalled_sse_client(server, session_id, padding=PADDING, limit=BURST) as slow:
        slow.writer.write_eof()
        await wait_until(lambda: open_connections(ctx) == 0, CUT_OFF_TIMEOUT)
        await wait_until(lambda: ctx.hub.subscriber_count == 0)
