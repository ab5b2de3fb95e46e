"""Taking a connection from aiohttp once a response's handshake is out.

After its handshake a stream lives for hours, on a connection that never carries
another HTTP request. Left with aiohttp, every idle stream would keep the request
handler's tasks and coroutine frames, the request with its parsed message, the
response, the HTTP parser and its message queue, and for a WebSocket its reader,
its message queue and its heartbeat timer: most of the 10.6 KiB (SSE) and 14.5 KiB
(WebSocket) aiohttp holds per idle stream (docs/BENCHMARKS.md). Once taken over,
the socket's protocol is a small object of ours and aiohttp has forgotten the
connection.

aiohttp has no public API for this. It rests on two things of aiohttp's request
handler: it is the socket's asyncio protocol, which writes to and closes its
``transport`` attribute, and its ``connection_lost()`` is its whole teardown (it
leaves the server's connections, drops its parser and its keep-alive timer, and
lets its task end). For a WebSocket, also on ``WebSocketResponse.prepare()`` not
yielding to the event loop between sending the 101 and returning, so that no
client frame reaches aiohttp's reader before the hand-over, and on the handler's
``_message_tail``, where aiohttp keeps what a client sent after its upgrade request
before the 101 (see :func:`early_bytes`). The transport and hardening tests pass
on aiohttp 3.12, 3.13 and 3.14, and fail at once if any of this changes; 3.14 is
required since it stops reading at 64 KiB what a client sends before the 101
(3.12 and 3.13 keep all of it).
"""

from __future__ import annotations

import asyncio

from aiohttp import web


def take_over(request: web.BaseRequest, protocol: asyncio.BaseProtocol) -> asyncio.Transport:
    """Make ``protocol`` the connection's protocol and have aiohttp let go of it without
    closing it. The handler must return its (prepared) response right after, with nothing
    awaited in between, and that response's ``write_eof()`` must write nothing: the socket
    is no longer aiohttp's. Raises ``ConnectionResetError`` if the client is gone."""
    handler = request.protocol
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    handler.transport = None  # first: from here aiohttp neither writes to it nor closes it
    transport.set_protocol(protocol)
    handler.connection_lost(None)
    return transport


def early_bytes(request: web.BaseRequest) -> bytes:
    """What the client sent after its upgrade request, before the response: WebSocket
    frames from a client that did not wait for the 101 (RFC 6455 4.1 asks it to; some do
    not). aiohttp keeps them for the reader ``prepare()`` makes, which nobody reads once
    the stream is taken over; taken here, right before ``prepare()``, they go to the
    stream's own reader instead."""
    handler = request.protocol
    tail: bytes = handler._message_tail
    handler._message_tail = b""
    return tail
