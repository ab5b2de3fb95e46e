"""Small aiohttp-based client helpers of the hardening tests."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import BaseTestServer

from tests.timing import EVENT_TIMEOUT


def url(server: BaseTestServer, path: str, scheme: str = "http") -> str:
    return f"{scheme}://{server.host}:{server.port}{path}"


def ws_url(server: BaseTestServer, session_id: str, query: str = "") -> str:
    return url(server, f"/ws/orchestrator/{session_id}{query}", "ws")


def sse_url(server: BaseTestServer, session_id: str, query: str = "") -> str:
    return url(server, f"/sse/orchestrator/{session_id}{query}")


async def next_event(ws: ClientWebSocketResponse) -> dict[str, Any] | None:
    """The next event, or ``None`` once the server has closed the connection."""
    message = await ws.receive(timeout=EVENT_TIMEOUT)
    if message.type is WSMsgType.TEXT:
        event: dict[str, Any] = json.loads(message.data)
        return event
    assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), message
    return None


async def refused_ws(
    http: ClientSession, target: str, headers: dict[str, str] | None = None
) -> tuple[dict[str, Any] | None, int | None]:
    """Open a WebSocket that the server refuses: its one event, and the close code."""
    async with http.ws_connect(target, headers=headers) as ws:
        notice = await next_event(ws)
        assert await next_event(ws) is None
        return notice, ws.close_code


async def read_until_final(ws: ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Every event up to the final one, and the close that follows it."""
    events = []
    while (event := await next_event(ws)) is not None:
        events.append(event)
    return events


def assert_error_body(body: dict[str, Any], code: str) -> None:
    """The one JSON error shape: ``error``, ``code``, ``reference``, nothing else."""
    assert set(body) == {"error", "code", "reference"}, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
