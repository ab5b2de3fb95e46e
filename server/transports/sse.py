"""Server-Sent Events transport: the request, on aiohttp and aiohttp-sse.

The response starts with a ``retry:`` line; each stored event is written as
its cached ``id:/event:/data:`` frame (framed once, shared by every
subscriber); heartbeats and control errors carry no ``id:`` so the
browser's last event id only ever moves to a stored event. The response ends
after the final event, and a reconnect that resumes at the final event gets
``204 No Content``, which makes ``EventSource`` stop for good.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from ..auth import check_stream_access
from ..context import STREAM_CONTEXT
from ..error_answers import answer_error
from ..errors import InvalidSessionId
from ..messages import is_valid_session_id
from ..query import resume_id
from .sse_stream import SseStream


class _EventStream(EventSourceResponse):
    """aiohttp-sse's response (its headers, chunking and method check) for the stream's
    start only: once the headers are out, the socket is taken from aiohttp
    (``stream.py``) and this response is done with.

    Without aiohttp-sse's ping task: the hub's heartbeat events, which a browser can see,
    replace its ``: ping`` comments. ``_ping_task`` is aiohttp-sse's own attribute: if a
    release renames it, every SSE test fails here at once.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            # aiohttp's own call once the handler has returned: the stream is no longer
            # aiohttp's (aiohttp-sse's would take the missing transport for a disconnect).
            return None
        writer = await super().prepare(request)
        pinger, self._ping_task = self._ping_task, None
        if pinger is not None:
            pinger.cancel()  # before its first step: nothing else refers to it
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        """Nothing: the stream writes its own last chunk, on a socket that is no longer
        aiohttp's (or, if the client went before that, on no socket at all)."""

    def stop_streaming(self) -> None:
        """Nothing to stop (aiohttp-sse's raises when there is no ping task)."""


def _chunk_encoded(response: web.StreamResponse) -> bool:
    return response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"


# EventSource polyfills, which do not send Last-Event-ID, resume with a query parameter
# of their own, added to the URL the page gave them, so it is newer than that URL's last_event_id:
# "lastEventId" (Yaffle's event-source-polyfill, by default), "lastEventID" (Mercure's).
_RESUME_PARAMETERS = ("lastEventId", "lastEventID", "last_event_id")


def resume_point(request: web.Request) -> str | None:
    """The ``Last-Event-ID`` header wins over the query (PROTOCOL.md); there, a polyfill's
    parameter wins over ``?last_event_id=``. An empty (or blank) one is none, wherever it is."""
    if header := request.headers.get("Last-Event-ID", "").strip():
        return header
    return resume_id(request, *_RESUME_PARAMETERS)


async def sse_handler(request: web.Request) -> web.StreamResponse:
    # Errors are answered here, not by the errors middleware (see server.app), like the
    # WebSocket's.
    response: _EventStream | None = None  # once prepared, no error answer can follow it
    try:
        ctx = request.app[STREAM_CONTEXT]
        session_id = request.match_info["session_id"]
        if not is_valid_session_id(session_id):
            raise InvalidSessionId()
        check_stream_access(request, ctx.settings, session_id)  # 401 without a valid token
        ticket = ctx.admission.connection(session_id, "sse")  # 503 over a limit; counts it
        stream: SseStream | None = None  # owns the subscription and the ticket once begun
        try:
            subscription = await ctx.hub.join(session_id, resume_point(request))
            try:
                if subscription.finished:
                    # Resumed at the final event: nothing will ever follow.
                    return web.Response(status=204)
                response = _EventStream(send_timeout=None)
                # The connection ends with the stream, as it never goes back to aiohttp:
                # say so (over aiohttp-sse's keep-alive), so no client reuses it.
                response.force_close()
                response.headers[hdrs.CONNECTION] = "close"
                try:
                    await response.prepare(request)
                    # The first write also sends the headers; direct writes follow it.
                    await response.write(f"retry: {ctx.settings.sse_retry_ms}\n\n".encode())
                    begun = SseStream(
                        ctx.hub,
                        ctx.streams,
                        subscription,
                        ticket,
                        # Not ``response.chunked``: aiohttp-sse sets that after prepare(),
                        # whatever the protocol version.
                        chunked=_chunk_encoded(response),
                    )
                    begun.begin(request, ctx.metrics, ctx.settings.heartbeat_interval)
                except ConnectionError:
                    return response  # the client went away
                stream = begun
                return response  # at once: see take_over()
            finally:
                if stream is None:
                    await ctx.hub.leave(subscription)
        finally:
            if stream is None:
                ticket.release()
    except Exception as exc:
        if response is not None and response.prepared:
            raise  # the stream has begun: no error answer can follow it
        return answer_error(request, exc)
