"""WebSocket transport: one text frame per event, commands from the client.

This handler reads the client's frames. Frames go out two ways: live events
and heartbeats written by the hub straight to the socket while the connection
keeps up, and a sending task for everything else (the replay, a backlog, the
answer to a ping, the final event), which runs only while there is something
to send. Both write whole frames only, so frames never interleave.

Close codes follow PROTOCOL.md: 1000 after the final event, 1001 on shutdown,
1008 refused, 1009 frame too large (aiohttp), 1013 too slow to keep up,
overloaded, or the event store unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import WebSocketError, WSCloseCode, WSMessage, WSMsgType, web

from ..auth import check_stream_access, check_websocket_origin
from ..context import STREAM_CONTEXT, StreamContext
from ..error_answers import INTERNAL_ERROR_MESSAGE, answer_error, log_failure
from ..errors import ServiceUnavailable, StreamError, refusal_reason
from ..hub import Frame, Subscription, SubscriptionClosed
from ..messages import (
    INVALID_MESSAGE,
    INVALID_SESSION_ID,
    SLOW_CONSUMER,
    ControlEvent,
    is_valid_session_id,
)
from ..query import query_value
from .pump import Outlet, pump, slow_consumer_notice

log = logging.getLogger(__name__)

_CLOSE_CODES = {
    "slow_consumer": (WSCloseCode.TRY_AGAIN_LATER, b"too slow to keep up; resume later"),
    "shutdown": (WSCloseCode.GOING_AWAY, b"server going away; reconnect and resume"),
}
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
# How long closing may wait on a peer that does not read, before the socket is dropped.
_CLOSE_TIMEOUT = 2.0


class _EventSocket(web.WebSocketResponse):
    """A WebSocket whose close, by us or by aiohttp (the peer's close frame, a protocol
    error), first stops the hub's direct writes: no data frame may follow a close frame."""

    # A slot, not an instance attribute: aiohttp's response already has 29 attributes, and
    # a 30th outgrows the instance dict's shared keys, which costs 1.3 KiB per connection.
    __slots__ = ("subscription",)

    def __init__(self, **kwargs: Any) -> None:
        self.subscription: Subscription | None = None
        super().__init__(**kwargs)

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if self.subscription is not None:
            self.subscription.detach()
        return await super().close(code=code, message=message, drain=drain)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    ctx = request.app[STREAM_CONTEXT]
    session_id = request.match_info["session_id"]
    # Until the handshake is done, errors (not a WebSocket request: 400) are answered here,
    # not by the errors middleware, whose frame would stay suspended around this one for
    # the whole stream (see server.app). After it, the socket ends with a close code.
    try:
        ws = _EventSocket(
            heartbeat=ctx.settings.heartbeat_interval,
            # aiohttp refuses a frame of exactly max_msg_size bytes (it checks ">="), while
            # max_frame_size is the largest frame accepted: 1009 only above it.
            max_msg_size=ctx.settings.max_frame_size + 1,
            timeout=_CLOSE_TIMEOUT,
            # No permessage-deflate: a frame encoded once is sent as is to every subscriber,
            # instead of being compressed again for each one.
            compress=False,
        )
        await ws.prepare(request)
    except Exception as exc:
        return answer_error(request, exc)
    if not is_valid_session_id(session_id):
        notice = ControlEvent.error(
            session_id[:128],
            INVALID_SESSION_ID,
            "Session ids are 8 to 128 characters of letters, digits, '-' and '_'.",
        )
        await ws.send_frame(notice.payload, WSMsgType.TEXT)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"invalid session id")
        return ws

    try:
        check_websocket_origin(request, ctx.settings)
        check_stream_access(request, ctx.settings, session_id)
        ticket = ctx.admission.connection(session_id, "websocket")  # counts the connection
    except StreamError as refused:
        await _refuse(ws, session_id, refused, ctx)
        return ws

    # The stream runs in this one coroutine frame, helpers are plain functions: an idle
    # stream sits here for hours, and each coroutine frame it is nested in costs about
    # 300 bytes per connection.
    with ticket:
        try:
            async with ctx.hub.subscribe(
                session_id, query_value(request, "last_event_id")
            ) as subscription:
                ws.subscription = subscription
                sender = _Sender(ws, subscription, request, ctx)
                sender.wake()  # the replay, if any; then it parks
                try:
                    # receive() rather than ``async for``: its __anext__ would be one more
                    # suspended coroutine (about 220 bytes) for every idle connection.
                    while (message := await ws.receive()).type not in _CLOSED:
                        _answer(message, subscription, ctx)
                finally:
                    subscription.detach()
                    await sender.stop()
                    if not ws.closed:
                        # The client vanished and this handler was cancelled. Closing stops
                        # aiohttp's heartbeat timer, which would otherwise hold the whole
                        # connection in memory for up to a heartbeat interval.
                        await _close(ws, WSCloseCode.GOING_AWAY, b"")
        except ServiceUnavailable as unavailable:
            # The event store cannot be reached (Redis down): an error event, then
            # 1013, and the client reconnects with back-off and resumes.
            if not ws.closed:
                await _refuse(ws, session_id, unavailable, ctx)
        except Exception as failure:
            await _fail(ws, session_id, request, failure)
    return ws


def _answer(message: WSMessage, subscription: Subscription, ctx: StreamContext) -> None:
    """A client's frame: ``{"type": "ping"}`` is answered with a heartbeat, anything else
    gets ``invalid_message``; a frame over ``max_frame_size`` is counted (aiohttp closes
    with 1009 itself)."""
    session_id = subscription.session_id
    if message.type is WSMsgType.TEXT and _is_ping(message.data):
        subscription.push_control(ControlEvent.heartbeat(session_id))
    elif message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
        subscription.push_control(
            ControlEvent.error(
                session_id,
                INVALID_MESSAGE,
                'Unknown message. The only command is {"type": "ping"}.',
            )
        )
    elif message.type is WSMsgType.ERROR and _too_big(message.data):
        # Counted now, as the handler may be cancelled as soon as the socket is gone.
        ctx.metrics.refused("frame_too_large")


async def _refuse(
    ws: web.WebSocketResponse, session_id: str, refused: StreamError, ctx: StreamContext
) -> None:
    """One ``error`` event with the refusal's code, then close: 1013 when overloaded
    (retry later), 1008 for a foreign origin or a bad token (do not retry)."""
    reason = refusal_reason(refused)
    if reason is not None:
        ctx.metrics.refused(reason)
    close_code = (
        WSCloseCode.TRY_AGAIN_LATER if refused.status >= 500 else WSCloseCode.POLICY_VIOLATION
    )
    notice = ControlEvent.error(session_id, refused.code, refused.message)
    await _end_with(ws, notice, close_code, refused.code.encode())


async def _fail(
    ws: web.WebSocketResponse, session_id: str, request: web.Request, failure: Exception
) -> None:
    """A bug (subscribing failed unexpectedly, say): logged with its traceback under a
    reference; the client gets an ``internal_error`` event that quotes the reference,
    then 1011, and reconnects with back-off (PROTOCOL.md)."""
    reference = log_failure(request, failure)
    if ws.closed:
        return
    notice = ControlEvent.error(
        session_id, "internal_error", INTERNAL_ERROR_MESSAGE, f"reference {reference}"
    )
    await _end_with(ws, notice, WSCloseCode.INTERNAL_ERROR, b"internal error")


async def _end_with(
    ws: web.WebSocketResponse, notice: ControlEvent, code: int, reason: bytes
) -> None:
    """The ``error`` event that says why (if the peer still reads), then the close."""
    with contextlib.suppress(ConnectionError):
        await ws.send_frame(notice.payload, WSMsgType.TEXT)
    await _close(ws, code, reason)


def _too_big(error: object) -> bool:
    return isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG


def _is_ping(text: str) -> bool:
    try:
        command = json.loads(text)
    except ValueError:
        return False
    return isinstance(command, dict) and command.get("type") == "ping"


def _ws_frame(frame: Frame) -> bytes:
    return frame.ws_frame


class _Sender:
    """The connection's sending task, started when something is queued for it and ended
    when nothing is left (the hub writes to a steady subscriber itself)."""

    __slots__ = ("_outlet", "_task", "_ws")

    def __init__(
        self,
        ws: web.WebSocketResponse,
        subscription: Subscription,
        request: web.Request,
        ctx: StreamContext,
    ) -> None:
        self._ws = ws
        self._task: asyncio.Task[None] | None = None
        self._outlet = Outlet(
            subscription,
            request.transport,
            ctx.metrics,
            "websocket",
            ctx.settings.heartbeat_interval,
            prebuilt=_ws_frame,
            send=self._send,
            on_wake=self.wake,
        )

    def wake(self) -> None:
        # A task that has parked is done at once (it returns in the step that parked it).
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def _send(self, frame: Frame) -> None:
        await self._ws.send_frame(frame.payload, WSMsgType.TEXT)

    async def _run(self) -> None:
        """Send until parked, the final event (then close 1000), a server-side close, or a
        dead peer."""
        ws = self._ws
        subscription = self._outlet.subscription
        try:
            finished = await pump(self._outlet, park=True)
            if finished:
                await _close(ws, WSCloseCode.OK, b"workflow finished")
        except SubscriptionClosed as closed:
            if closed.reason == SLOW_CONSUMER:
                notice = slow_consumer_notice(subscription.session_id)
                with contextlib.suppress(ConnectionError, TimeoutError):
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await ws.send_frame(notice.payload, WSMsgType.TEXT)
            code, reason = _CLOSE_CODES[closed.reason]
            await _close(ws, code, reason)
        except ConnectionError:
            pass  # the peer went away; the reader loop sees it too
        finally:
            # A finished task keeps its coroutine and its place in asyncio's set of tasks
            # (about 900 bytes) for as long as it is referenced: a parked one is let go.
            self._task = None


async def _close(ws: web.WebSocketResponse, code: int, reason: bytes) -> None:
    # aiohttp drops the socket itself when the peer does not answer in time.
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(_CLOSE_TIMEOUT * 2):
            await ws.close(code=code, message=reason)
