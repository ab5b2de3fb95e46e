"""Server-Sent Events transport, on aiohttp-sse.

The response starts with a ``retry:`` line; each stored event is written as
its cached ``id:/event:/data:`` frame (framed once, shared by every
subscriber); heartbeats and control errors carry no ``id:`` so the
browser's last event id only ever moves to a stored event. The response ends
after the final event, and a reconnect that resumes at the final event gets
``204 No Content``, which makes ``EventSource`` stop for good.
"""

from __future__ import annotations

import contextlib

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from ..auth import check_stream_access
from ..context import STREAM_CONTEXT
from ..error_answers import answer_error
from ..errors import InvalidSessionId
from ..hub import Frame, SubscriptionClosed
from ..messages import SLOW_CONSUMER, is_valid_session_id
from ..query import query_value
from .pump import Outlet, pump, slow_consumer_notice


class _EventStream(EventSourceResponse):
    """aiohttp-sse's response (its headers, chunking and method check) without its ping
    task: the hub's heartbeat events, which a browser can see, replace its ``: ping``
    comments. Even cancelled, that task stayed referenced by the response for the life of
    the stream, with its coroutine: 0.97 KiB per idle stream (docs/BENCHMARKS.md).

    ``_ping_task`` is aiohttp-sse's own attribute: if a release renames it, every SSE test
    fails here at once rather than the memory quietly coming back.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        pinger, self._ping_task = self._ping_task, None
        if pinger is not None:
            pinger.cancel()  # before its first step: nothing else refers to it
        return writer

    def stop_streaming(self) -> None:
        """Nothing to stop (aiohttp-sse's raises when there is no ping task)."""


def _sse_chunk(frame: Frame) -> bytes:
    return frame.sse_chunk


def _sse_frame(frame: Frame) -> bytes:
    return frame.sse_frame


def _nothing_to_do() -> None:
    """An SSE stream's wake-up: while parked, its handler waits on the subscription (so a
    wake resolves that wait), and while it sends, pump() takes what was queued."""


def _chunk_encoded(response: web.StreamResponse) -> bool:
    return response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"


def resume_point(request: web.Request) -> str | None:
    """The ``Last-Event-ID`` header wins over ``?last_event_id=`` (PROTOCOL.md)."""
    return request.headers.get("Last-Event-ID") or query_value(request, "last_event_id") or None


async def sse_handler(request: web.Request) -> web.StreamResponse:
    # Errors are answered here, not by the errors middleware (see server.app): its frame
    # would stay suspended around this one for the whole stream.
    stream: _EventStream | None = None  # once prepared, no error answer can follow it
    try:
        ctx = request.app[STREAM_CONTEXT]
        session_id = request.match_info["session_id"]
        if not is_valid_session_id(session_id):
            raise InvalidSessionId()
        check_stream_access(request, ctx.settings, session_id)  # 401 without a valid token
        # One frame for the whole stream (no helper coroutine): it stays suspended for hours.
        with ctx.admission.connection(session_id, "sse"):  # 503 over a limit; counts the stream
            async with ctx.hub.subscribe(session_id, resume_point(request)) as subscription:
                if subscription.finished:
                    # Resumed at the final event: nothing will ever follow.
                    return web.Response(status=204)

                response = stream = _EventStream(send_timeout=None)
                await response.prepare(request)

                async def send(frame: Frame) -> None:
                    await response.write(frame.sse_frame)

                try:
                    # The first write also sends the headers; direct writes may only follow it.
                    await response.write(f"retry: {ctx.settings.sse_retry_ms}\n\n".encode())
                    outlet = Outlet(
                        subscription,
                        request,
                        ctx.metrics,
                        "sse",
                        ctx.settings.heartbeat_interval,
                        # What goes on the wire: an HTTP/1.1 response is chunk-encoded and
                        # takes the cached chunk as is; an HTTP/1.0 one (nginx's default to
                        # its upstreams) the bare frame. Not ``response.chunked``: aiohttp-sse
                        # sets that after prepare(), whatever the protocol version.
                        prebuilt=_sse_chunk if _chunk_encoded(response) else _sse_frame,
                        send=send,
                        on_wake=_nothing_to_do,
                    )
                    # Parked, this handler waits on the subscription itself rather than
                    # inside pump(): one suspended coroutine frame (about 250 bytes) less
                    # for every idle stream.
                    while await pump(outlet, park=True) is None:
                        await subscription.wait()
                except SubscriptionClosed as closed:
                    if closed.reason == SLOW_CONSUMER:
                        with contextlib.suppress(ConnectionError):
                            await response.write(slow_consumer_notice(session_id).sse_frame)
                except ConnectionError:
                    pass  # the client went away
                finally:
                    subscription.detach()  # before the response's last chunk
                with contextlib.suppress(ConnectionError):
                    await response.write_eof()
                return response
    except Exception as exc:
        if stream is not None and stream.prepared:
            raise  # the stream has begun: no error answer can follow it
        return answer_error(request, exc)
