"""Closing idle REST keep-alive connections as soon as shutdown begins.

aiohttp 3.14's graceful shutdown marks every connection closing, but the socket of
one kept alive between two requests (or opened and not used yet) stays open until the
app's ``on_shutdown`` has returned: here, until the running workflows have finished or
the grace has passed. A request its client sends meanwhile is dropped unread, and the
client waits for that long. Closed at once, the client's next request fails as a closed
connection, which clients (browsers by themselves) send again, to another process.

aiohttp has no public API for this. Like :mod:`server.transports.takeover`, it rests on
its request handler's state: its server's list of connections (the handler's
``_manager``), and, for each connection, whether a request is being handled
(``_request_in_progress``, until its response is wholly sent, a file's ``sendfile``
included), whether requests were read and not handled yet (``_messages``), and whether
its task waits for the next request (``_waiter``) or has ended (``_task_handler``).
A request that was read is always answered. ``tests/hardening/test_shutdown.py``
pins each of these, and fails at once if aiohttp changes them. A stream's connection
is not aiohttp's after its handshake: it is not in that list.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class KeepAlives:
    """Finds aiohttp's server from a request, and closes its idle connections."""

    __slots__ = ("_server",)

    def __init__(self) -> None:
        self._server: Any = None  # aiohttp's web.Server, known from the first request

    def seen(self, request: web.BaseRequest) -> None:
        if self._server is None:
            self._server = getattr(request.protocol, "_manager", None)

    def close_idle(self) -> None:
        """Close every connection with no request read and unanswered (what its last
        answer still has buffered is sent first)."""
        server = self._server
        if server is None:
            return
        for handler in list(server.connections):
            transport = handler.transport
            if transport is None or transport.is_closing():
                continue
            if handler._request_in_progress or handler._messages:
                continue
            task = handler._task_handler
            if handler._waiter is None and task is not None and not task.done():
                continue  # between a request read and its handler: it will be answered
            transport.close()
