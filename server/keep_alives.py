"""Closing idle REST keep-alive connections as soon as shutdown begins.

aiohttp 3.14's graceful shutdown marks every connection closing, but the socket of
one kept alive between two requests stays open until the app's ``on_shutdown`` has
returned: here, until the running workflows have finished or the grace has passed. A
request its client sends meanwhile is dropped unread, and the client waits for that
long. Closed at once, the client's next request fails as a closed connection, which
clients (browsers by themselves) send again, to another process.

Which connections are idle is counted here: a request starts when the middleware sees
it, and is answered when its response is prepared (its bytes are written right after,
in the same turn of the event loop unless the socket is backed up, and a socket with
bytes still to send is never taken for idle). A stream's connection is forgotten when
its request comes (it carries no other, and an entry would cost every stream memory);
after its handshake it is not aiohttp's any more (:mod:`server.transports.takeover`),
and a socket whose protocol is not aiohttp's request handler is never closed here.
"""

from __future__ import annotations

import asyncio
import weakref

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class KeepAlives:
    """The requests in progress on each REST connection."""

    __slots__ = ("_busy",)

    def __init__(self) -> None:
        # A closed connection's entry goes with its transport. The count is a list that
        # is changed in place: storing a new value would make a new weak reference on
        # every request (a third of what this costs a request).
        self._busy: weakref.WeakKeyDictionary[asyncio.BaseTransport, list[int]] = (
            weakref.WeakKeyDictionary()
        )

    def started(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is not None:
            busy = self._busy.get(transport)
            if busy is None:
                self._busy[transport] = busy = [0]
            busy[0] += 1

    def forget(self, request: web.BaseRequest) -> None:
        """The connection becomes a stream's: nothing to close here, nothing to keep."""
        transport = request.transport
        if transport is not None:
            self._busy.pop(transport, None)

    def answered(self, request: web.BaseRequest) -> None:
        transport = request.transport
        busy = None if transport is None else self._busy.get(transport)
        if busy and busy[0]:
            busy[0] -= 1

    def close_idle(self) -> int:
        """Close every connection of aiohttp's with no request in progress and nothing
        left to send; returns how many."""
        closed = 0
        for transport, busy in list(self._busy.items()):
            if busy[0] or transport.is_closing():
                continue
            if not isinstance(transport.get_protocol(), RequestHandler):
                continue  # a stream's, since its handshake
            if isinstance(transport, asyncio.WriteTransport) and (
                transport.get_write_buffer_size()
            ):
                continue
            transport.close()
            closed += 1
        return closed
