"""What both transports do the same way: move a subscription's frames onto one socket.

A transport says only how a frame is written on its protocol; the pump does the
rest, identically for WebSocket and SSE:

* while nothing is queued and the socket is not backed up, the hub writes live
  events and heartbeats straight to the socket (the subscription's
  :class:`~server.hub.Sink`), as the transport's pre-built bytes, shared by every
  subscriber: no queue, no task switch;
* otherwise the connection's task sends what is queued (the replay, a backlog,
  a frame for this connection only, the final event); a send to a backed-up
  socket may wait at most ``heartbeat_interval``, then the subscriber is cut off
  as a slow consumer.

A connection's task ends whenever it has nothing left to send (``park``) and is
started again when something is queued, so an idle stream holds no task of its
own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..hub import Frame, Sink, Subscription
from ..loop_share import ByteBudget
from ..messages import SLOW_CONSUMER, ControlEvent, StoredEvent
from ..metrics import Metrics


def slow_consumer_notice(session_id: str) -> ControlEvent:
    return ControlEvent.error(
        session_id, SLOW_CONSUMER, "This connection fell too far behind; reconnect to resume."
    )


class Outlet:
    """One connection's way out: its subscription, its socket, how its protocol sends a
    frame, and its transport's metrics. Made once per connection, when its first bytes
    (the headers) are out; from then on the hub may write to the socket directly."""

    __slots__ = ("delivered", "interval", "latency", "send", "socket", "subscription")

    def __init__(
        self,
        subscription: Subscription,
        socket: asyncio.Transport | None,
        metrics: Metrics,
        transport_name: str,
        interval: float,
        *,
        prebuilt: Callable[[Frame], bytes] | None,
        send: Callable[[Frame], Awaitable[None]],
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        """``prebuilt`` gives a frame's ready-to-write bytes for direct writes (``None``:
        everything goes through ``send``); ``send`` writes a frame and, when that leaves
        the socket backed up, waits for it to drain, at most ``interval`` seconds
        (``TimeoutError``); ``on_wake``: see :meth:`Subscription.park`."""
        self.subscription = subscription
        self.socket = socket  # fixed for the connection's life; closed, it says so
        self.send = send
        self.interval = interval
        self.delivered = metrics.delivered.labels(transport=transport_name)
        replayed = subscription.position
        self.latency = metrics.latency_sampler(transport_name, replayed.seq if replayed else 0)
        if prebuilt is not None and self.socket is not None:
            histogram = metrics.delivery_latency.labels(transport=transport_name)
            subscription.attach(Sink(self.socket, prebuilt, self.delivered, histogram), on_wake)


async def pump(outlet: Outlet, *, park: bool = False) -> bool | None:
    """Send queued frames until the final event (``True``), until the peer is gone or
    cut off (``False``), or, with ``park``, until nothing is left to send and the hub
    writes what comes (``None``: call again on wake). Raises ``SubscriptionClosed``
    when the server ends the subscription. Direct writes go on until the transport
    calls ``subscription.detach()``."""
    subscription = outlet.subscription
    socket = outlet.socket
    budget = ByteBudget()  # a replay of large events the socket takes at once: loop_share
    while not subscription.finished:
        frame = subscription.get_nowait()
        if frame is None:
            if park and subscription.park():
                return None
            await subscription.wait()
            continue
        if socket is None or socket.is_closing():
            return False
        try:
            await outlet.send(frame)
        except TimeoutError:
            # The peer took nothing for a heartbeat interval: cut it off.
            subscription.close("slow_consumer")
            socket.abort()
            return False
        if isinstance(frame, StoredEvent):
            outlet.delivered.inc()
            outlet.latency.sent(frame)
        if budget.spent(len(frame.payload)):
            await asyncio.sleep(0)
    return True
