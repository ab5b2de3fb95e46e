"""What both transports do the same way: move a subscription's frames onto one socket.

A transport says only how a frame is written on its protocol; the pump does the
rest, identically for WebSocket and SSE:

* while nothing is queued and the socket is not backed up, the hub writes live
  events straight to the socket (the subscription's :class:`~server.hub.Sink`),
  as the transport's pre-built bytes, shared by every subscriber: no queue, no
  task switch;
* otherwise this task sends what is queued, and a heartbeat when nothing came for
  ``heartbeat_interval``; a send to a backed-up socket may wait at most that long,
  then the subscriber is cut off as a slow consumer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..hub import Frame, Sink, Subscription
from ..messages import SLOW_CONSUMER, ControlEvent, StoredEvent
from ..metrics import Metrics


def slow_consumer_notice(session_id: str) -> ControlEvent:
    return ControlEvent.error(
        session_id, SLOW_CONSUMER, "This connection fell too far behind; reconnect to resume."
    )


async def pump(
    subscription: Subscription,
    request: web.Request,
    metrics: Metrics,
    transport_name: str,
    interval: float,
    *,
    prebuilt: Callable[[StoredEvent], bytes] | None,
    send: Callable[[Frame], Awaitable[None]],
) -> bool:
    """Write frames until the final event (``True``) or until the peer is gone or cut
    off (``False``). ``prebuilt`` gives an event's ready-to-write bytes for direct
    writes (``None``: always go through ``send``). Direct writes stop when this
    returns; a transport that may close its protocol meanwhile (a WebSocket's closing
    handshake) calls ``subscription.detach()`` first. Raises ``SubscriptionClosed``
    when the server ends the subscription."""
    delivered = metrics.delivered.labels(transport=transport_name)
    replayed = subscription.position
    latency = metrics.latency_sampler(transport_name, replayed.seq if replayed else 0)
    socket = request.transport  # fixed for the connection's life; closed, it says so

    if prebuilt is not None and socket is not None:
        histogram = metrics.delivery_latency.labels(transport=transport_name)
        subscription.attach(Sink(socket, prebuilt, delivered, histogram))
    try:
        while not subscription.finished:
            frame = await subscription.get(interval)
            if frame is None:
                frame = ControlEvent.heartbeat(subscription.session_id)
            if socket is None or socket.is_closing():
                return False
            if socket.get_write_buffer_size():
                # The peer is behind: this send may wait on it, so bound the wait.
                try:
                    async with asyncio.timeout(interval):
                        await send(frame)
                except TimeoutError:
                    subscription.close("slow_consumer")
                    socket.abort()
                    return False
            else:
                await send(frame)
            if isinstance(frame, StoredEvent):
                delivered.inc()
                latency.sent(frame)
        return True
    finally:
        subscription.detach()
