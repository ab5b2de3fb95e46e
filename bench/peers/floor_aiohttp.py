"""The floor: what one socket write per delivery costs on aiohttp, and nothing else.

Not a design to ship (no buffer, replay, validation or back-pressure: a
backed-up socket just buffers). The publish handler encodes the event once,
builds ONE WebSocket frame and ONE chunked SSE chunk, and hands the same
``bytes`` to ``transport.write`` of every subscriber: no task switch, no
per-subscriber encoding. Its CPU per delivery is the lower bound any aiohttp
server pays per delivery (the send syscall and the event loop), which tells
how far below the naive peer a design can go. Run it with
``python -m bench --servers ours,naive,floor``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime

from aiohttp import web

from bench.peers import PEER_BACKLOG

WS_TRANSPORTS = web.AppKey("ws_transports", dict[str, set[asyncio.Transport]])
SSE_TRANSPORTS = web.AppKey("sse_transports", dict[str, set[asyncio.Transport]])
SEQUENCES = web.AppKey("sequences", dict[str, int])


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented, uncompressed server-to-client text frame."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 1 << 16:
        head = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return head + payload


async def ws_handler(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    ws = web.WebSocketResponse(heartbeat=30.0, compress=False)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    subscribers = request.app[WS_TRANSPORTS].setdefault(session_id, set())
    subscribers.add(transport)
    try:
        async for _message in ws:
            pass
    finally:
        subscribers.discard(transport)
    return ws


async def sse_handler(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    transport = request.transport
    assert transport is not None
    subscribers = request.app[SSE_TRANSPORTS].setdefault(session_id, set())
    subscribers.add(transport)
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        subscribers.discard(transport)
    return response


async def publish(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    event = await request.json()
    sequences = request.app[SEQUENCES]
    seq = sequences[session_id] = sequences.get(session_id, 0) + 1
    event["session_id"] = session_id
    event["timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    event["id"] = str(seq)
    event["seq"] = seq
    payload = json.dumps(event, separators=(",", ":")).encode()
    ws = request.app[WS_TRANSPORTS].get(session_id)
    if ws:
        frame = ws_text_frame(payload)
        for transport in ws:
            if not transport.is_closing():
                transport.write(frame)
    sse = request.app[SSE_TRANSPORTS].get(session_id)
    if sse:
        block = b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event["type"].encode(), payload)
        chunk = b"%x\r\n%s\r\n" % (len(block), block)
        for transport in sse:
            if not transport.is_closing():
                transport.write(chunk)
    return web.json_response({"id": str(seq), "seq": seq}, status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app() -> web.Application:
    app = web.Application()
    app[WS_TRANSPORTS] = {}
    app[SSE_TRANSPORTS] = {}
    app[SEQUENCES] = {}
    app.router.add_get("/ws/orchestrator/{session_id}", ws_handler)
    app.router.add_get("/sse/orchestrator/{session_id}", sse_handler)
    app.router.add_post("/api/sessions/{session_id}/events", publish)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.floor_aiohttp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args()
    web.run_app(
        create_app(),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        backlog=PEER_BACKLOG,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
