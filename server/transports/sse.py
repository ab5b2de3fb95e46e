"""Server-Sent Events transport, on aiohttp-sse.

The response starts with a ``retry:`` line; each stored event is written as
its cached ``id:/event:/data:`` frame (framed once, shared by every
subscriber); heartbeats and control errors carry no ``id:`` so the
browser's last event id only ever moves to a stored event. The response ends
after the final event, and a reconnect that resumes at the final event gets
``204 No Content``, which makes ``EventSource`` stop for good.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..auth import check_stream_access
from ..context import STREAM_CONTEXT, StreamContext
from ..errors import InvalidSessionId
from ..hub import SubscriptionClosed
from ..messages import SLOW_CONSUMER, ControlEvent, StoredEvent, is_valid_session_id
from ..metrics import LATENCY_SAMPLE_EVERY

# aiohttp-sse's own ": ping" comments are replaced by heartbeat events, which
# a browser can see; its ping task still serves as the "stream alive" sentinel.
_NO_COMMENT_PINGS = 365 * 24 * 3600.0


def resume_point(request: web.Request) -> str | None:
    """The ``Last-Event-ID`` header wins over ``?last_event_id=`` (PROTOCOL.md)."""
    return request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or None


async def sse_handler(request: web.Request) -> web.StreamResponse:
    ctx = request.app[STREAM_CONTEXT]
    session_id = request.match_info["session_id"]
    if not is_valid_session_id(session_id):
        raise InvalidSessionId()
    check_stream_access(request, ctx.settings, session_id)  # 401 without a valid token
    with ctx.admission.connection(session_id, "sse"):  # 503 over a limit; counts the stream
        return await _stream(request, ctx, session_id)


async def _stream(request: web.Request, ctx: StreamContext, session_id: str) -> web.StreamResponse:
    async with ctx.hub.subscribe(session_id, resume_point(request)) as subscription:
        if subscription.finished:
            # Resumed at the final event: nothing will ever follow.
            return web.Response(status=204)

        response = EventSourceResponse(
            ping_interval=_NO_COMMENT_PINGS,
            send_timeout=None,
        )
        await response.prepare(request)
        delivered = ctx.metrics.delivered.labels(transport="sse")
        replayed = subscription.position
        latency = ctx.metrics.latency_sampler("sse", replayed.seq if replayed else 0)
        interval = ctx.settings.heartbeat_interval

        socket = request.transport  # fixed for the connection's life; closed, it says so

        def write_now(event: StoredEvent) -> bool:
            if socket is None or socket.is_closing() or socket.get_write_buffer_size():
                return False  # backed up: queue it, and let this task wait on the socket
            socket.write(event.sse_chunk)  # the response is chunked: one cached chunk
            delivered.inc()
            if event.seq % LATENCY_SAMPLE_EVERY == 1:  # only sampled events pay for a call
                latency.sent(event)
            return True

        try:
            # The first write also sends the headers; direct writes may only follow it.
            await response.write(f"retry: {ctx.settings.sse_retry_ms}\n\n".encode())
            if response.chunked:
                subscription.sink = write_now
            while not subscription.finished:
                frame = await subscription.get(interval)
                if frame is None:
                    frame = ControlEvent.heartbeat(session_id)
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                if transport.get_write_buffer_size():
                    # The peer is behind: this write may wait on it, so bound the wait.
                    try:
                        async with asyncio.timeout(interval):
                            await response.write(frame.sse_frame)
                    except TimeoutError:
                        subscription.close("slow_consumer")
                        transport.abort()
                        break
                else:
                    await response.write(frame.sse_frame)
                if isinstance(frame, StoredEvent):
                    delivered.inc()
                    latency.sent(frame)
        except SubscriptionClosed as closed:
            if closed.reason == SLOW_CONSUMER:
                notice = ControlEvent.error(
                    session_id,
                    SLOW_CONSUMER,
                    "This connection fell too far behind; reconnect to resume.",
                )
                with contextlib.suppress(ConnectionError):
                    await response.write(notice.sse_frame)
        except ConnectionError:
            pass  # the client went away
        finally:
            response.stop_streaming()
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
