"""WebSocket transport: the handshake, on aiohttp.

The handler admits the client, subscribes, and has aiohttp answer the handshake;
then the socket is taken from aiohttp, and ``WsStream`` (``ws_stream.py``) runs
the stream: frames out, the client's frames in, pings and the close.

A client that is refused (a bad session id, origin or token, a limit, the event
store unreachable) gets its ``error`` event and close code from aiohttp's
WebSocket, which is gone a moment later: 1008 refused (do not reconnect), 1011
internal error, 1013 overloaded or unavailable (retry later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from ..auth import check_stream_access, check_websocket_origin
from ..context import STREAM_CONTEXT, StreamContext
from ..error_answers import INTERNAL_ERROR_MESSAGE, answer_error, log_failure
from ..errors import ServiceUnavailable, StreamError, refusal_reason
from ..messages import INVALID_SESSION_ID, ControlEvent, is_valid_session_id
from ..query import resume_id
from .takeover import early_bytes
from .ws_stream import CLOSE_TIMEOUT, WsStream

log = logging.getLogger(__name__)


class _Handshake(web.WebSocketResponse):
    """aiohttp's WebSocket for the handshake only: once the 101 is out the socket is
    taken from aiohttp (``stream.py``), and aiohttp's own close at the end of the
    handler, on a socket that is no longer its own, must do nothing."""

    async def write_eof(self) -> None:  # type: ignore[override]
        """Nothing: the stream closes its socket itself."""


def _websocket(*, handshake_only: bool) -> web.WebSocketResponse:
    kind = _Handshake if handshake_only else web.WebSocketResponse
    # No permessage-deflate: a frame encoded once is sent as is to every subscriber,
    # instead of being compressed again for each one.
    return kind(timeout=CLOSE_TIMEOUT, compress=False)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    ctx = request.app[STREAM_CONTEXT]
    session_id = request.match_info["session_id"]
    # Errors are answered here, not by the errors middleware (see server.app), like SSE's.
    ws = _websocket(handshake_only=True)  # answers the handshake if the stream begins
    if not ws.can_prepare(request).ok:
        return answer_error(request, web.HTTPBadRequest())  # not a WebSocket request
    if not is_valid_session_id(session_id):
        notice = ControlEvent.error(
            session_id[:128],
            INVALID_SESSION_ID,
            "Session ids are 8 to 128 characters of letters, digits, '-' and '_'.",
        )
        return await _end_with(request, notice, WSCloseCode.POLICY_VIOLATION, b"invalid session id")
    try:
        check_websocket_origin(request, ctx.settings)
        check_stream_access(request, ctx.settings, session_id)
        ticket = ctx.admission.connection(session_id, "websocket")  # counts the connection
    except StreamError as refused:
        return await _refuse(request, session_id, refused, ctx)

    stream: WsStream | None = None  # owns the subscription and the ticket once begun
    try:
        try:
            resume = resume_id(request, "last_event_id")  # as over SSE
            subscription = await ctx.hub.join(session_id, resume)
        except ServiceUnavailable as unavailable:
            # The event store cannot be reached (Redis down): an error event, then 1013,
            # and the client reconnects with back-off and resumes.
            return await _refuse(request, session_id, unavailable, ctx)
        except Exception as failure:
            return await _fail(request, session_id, failure)
        try:
            try:
                early = early_bytes(request)  # nothing awaited between this and prepare()
                await ws.prepare(request)
                begun = WsStream(
                    ctx.hub,
                    ctx.streams,
                    subscription,
                    ticket,
                    metrics=ctx.metrics,
                    max_frame_size=ctx.settings.max_frame_size,
                )
                # In the step that sent the 101 (aiohttp's prepare() does not yield while
                # the socket takes its bytes), so no frame of the client's, which may only
                # follow the 101, can reach aiohttp's reader first.
                begun.begin(request, ctx.metrics, ctx.settings.heartbeat_interval)
                if early:
                    begun.early_frames(early)
            except ConnectionError:
                return ws  # the client went away
            stream = begun
            return ws  # at once: see take_over()
        finally:
            if stream is None:
                await ctx.hub.leave(subscription)
    finally:
        if stream is None:
            ticket.release()


async def _refuse(
    request: web.Request, session_id: str, refused: StreamError, ctx: StreamContext
) -> web.WebSocketResponse:
    """One ``error`` event with the refusal's code, then close: 1013 when overloaded
    (retry later), 1008 for a foreign origin or a bad token (do not retry)."""
    reason = refusal_reason(refused)
    if reason is not None:
        ctx.metrics.refused(reason)
    close_code = (
        WSCloseCode.TRY_AGAIN_LATER if refused.status >= 500 else WSCloseCode.POLICY_VIOLATION
    )
    notice = ControlEvent.error(session_id, refused.code, refused.message)
    return await _end_with(request, notice, close_code, refused.code.encode())


async def _fail(request: web.Request, session_id: str, failure: Exception) -> web.WebSocketResponse:
    """A bug (subscribing failed unexpectedly, say): logged with its traceback under a
    reference; the client gets an ``internal_error`` event that quotes the reference,
    then 1011, and reconnects with back-off (PROTOCOL.md)."""
    reference = log_failure(request, failure)
    notice = ControlEvent.error(
        session_id, "internal_error", INTERNAL_ERROR_MESSAGE, f"reference {reference}"
    )
    return await _end_with(request, notice, WSCloseCode.INTERNAL_ERROR, b"internal error")


async def _end_with(
    request: web.Request, notice: ControlEvent, code: int, reason: bytes
) -> web.WebSocketResponse:
    """The handshake, the ``error`` event that says why (if the peer still reads), then
    the close; aiohttp drops the socket itself when the peer does not answer in time."""
    ws = _websocket(handshake_only=False)
    try:
        await ws.prepare(request)
    except ConnectionError:
        return ws  # the client is gone: no handshake was made, so none is to be closed
    with contextlib.suppress(ConnectionError):
        await ws.send_frame(notice.payload, WSMsgType.TEXT)
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(CLOSE_TIMEOUT * 2):
            await ws.close(code=code, message=reason)
    return ws
