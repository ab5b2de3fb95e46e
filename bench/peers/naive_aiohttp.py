"""The naive ceiling: a minimal aiohttp fan-out with no buffer, replay or validation.

What a careful engineer writes in an afternoon: the publish handler parses
the body, stamps it, encodes it once, and awaits ``send_str`` (or ``write``)
on every subscriber of the session in turn. There is no history, so a late or
reconnecting subscriber misses everything published before it arrived, and
nothing is validated. ``python -m bench.peers.naive_aiohttp --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime

from aiohttp import web

from bench.peers import PEER_BACKLOG

WS_SUBSCRIBERS = web.AppKey("ws_subscribers", dict[str, set[web.WebSocketResponse]])
SSE_SUBSCRIBERS = web.AppKey("sse_subscribers", dict[str, set[web.StreamResponse]])
SEQUENCES = web.AppKey("sequences", dict[str, int])


async def ws_handler(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    subscribers = request.app[WS_SUBSCRIBERS].setdefault(session_id, set())
    subscribers.add(ws)
    try:
        async for _message in ws:
            pass  # nothing to answer: the stream is one way
    finally:
        subscribers.discard(ws)
    return ws


async def sse_handler(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    subscribers = request.app[SSE_SUBSCRIBERS].setdefault(session_id, set())
    subscribers.add(response)
    try:
        # Held open until the client goes away (handler_cancellation cancels us).
        await asyncio.get_running_loop().create_future()
    finally:
        subscribers.discard(response)
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
    text = json.dumps(event, separators=(",", ":"))
    for ws in list(request.app[WS_SUBSCRIBERS].get(session_id, ())):
        try:
            await ws.send_str(text)
        except ConnectionError:
            pass
    sse = request.app[SSE_SUBSCRIBERS].get(session_id)
    if sse:
        frame = f"id: {seq}\nevent: {event.get('type', 'message')}\ndata: {text}\n\n".encode()
        for response in list(sse):
            try:
                await response.write(frame)
            except ConnectionError:
                pass
    return web.json_response({"id": str(seq), "seq": seq}, status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app() -> web.Application:
    app = web.Application()
    app[WS_SUBSCRIBERS] = {}
    app[SSE_SUBSCRIBERS] = {}
    app[SEQUENCES] = {}
    app.router.add_get("/ws/orchestrator/{session_id}", ws_handler)
    app.router.add_get("/sse/orchestrator/{session_id}", sse_handler)
    app.router.add_post("/api/sessions/{session_id}/events", publish)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.naive_aiohttp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
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
