"""A bug under a stream is answered like any other error, and leaks nothing.

The stream handlers answer their own errors (the errors middleware does not wait
around a stream: its frame would cost every connection about 340 bytes, see
``errors_middleware`` in ``server/app.py``). Here the bug is a broker whose reads
fail with an unexpected exception that carries a secret:

* SSE fails before its stream starts: the JSON error body, 500 ``internal_error``,
  with a reference that names the log line holding the traceback;
* the WebSocket fails after its handshake: an ``internal_error`` event whose details
  quote that reference, then close code 1011 (PROTOCOL.md: reconnect with back-off).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import BaseTestServer

from server.app import create_app
from server.brokers.base import Replay
from server.brokers.memory import MemoryBroker
from server.config import Settings
from server.messages import StreamPosition
from tests.clients import http_url, new_session_id, ws_url
from tests.hardening.support import FakeAgents

SECRET = "password=hunter2"


class BrokenReads(MemoryBroker):
    async def read(
        self, session_id: str, after: StreamPosition | None, limit: int | None = None
    ) -> Replay:
        raise RuntimeError(f"connection to the store failed, {SECRET}")


@pytest.fixture
async def broken(
    aiohttp_server: Callable[..., Awaitable[BaseTestServer]], settings: Settings
) -> BaseTestServer:
    broker = BrokenReads(settings.buffer_size, settings.session_ttl)
    return await aiohttp_server(create_app(settings, broker=broker, agents=FakeAgents()))


def logged_with(caplog: pytest.LogCaptureFixture, reference: str) -> logging.LogRecord:
    """The one log record of ``reference``: at ERROR, with the exception's traceback."""
    (record,) = [r for r in caplog.records if getattr(r, "reference", None) == reference]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and SECRET in str(record.exc_info[1])
    return record


async def test_sse_answers_a_bug_with_the_json_error_body(
    broken: BaseTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with aiohttp.ClientSession() as http:
        url = http_url(broken, f"/sse/orchestrator/{new_session_id()}")
        async with http.get(url, headers={"Accept": "text/event-stream"}) as response:
            text = await response.text()
            assert response.status == 500, text
            assert response.content_type == "application/json"
    body = json.loads(text)
    assert set(body) == {"error", "code", "reference"}
    assert body["code"] == "internal_error"
    assert SECRET not in text and "RuntimeError" not in text
    logged_with(caplog, body["reference"])


async def test_websocket_reports_a_bug_and_closes_with_1011(
    broken: BaseTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    session_id = new_session_id()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(broken, f"/ws/orchestrator/{session_id}")) as ws:
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.TEXT
            event = json.loads(message.data)
            closing = await ws.receive(timeout=5)
    assert closing.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR
    assert event["type"] == "error" and event["code"] == "internal_error"
    assert event["session_id"] == session_id
    assert SECRET not in message.data and "RuntimeError" not in message.data
    prefix, reference = event["details"].split(" ")
    assert prefix == "reference"
    logged_with(caplog, reference)
