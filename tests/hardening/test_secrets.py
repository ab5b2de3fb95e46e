"""An agent's exception text may hold secrets: it goes to the log, never to a client."""

from __future__ import annotations

import logging

import pytest
from aiohttp import ClientSession

from tests.hardening.clients import read_until_final, sse_url, url, ws_url
from tests.hardening.conftest import StartServer
from tests.hardening.support import FakeAgents

SECRET = "sk-live-4f9c2a7e1b8d6035"


@pytest.mark.parametrize("where", ["agent", "workflow"])
async def test_a_secret_in_an_exception_reaches_no_event_and_no_body_only_the_log(
    start: StartServer,
    http: ClientSession,
    agents: FakeAgents,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    """An agent (or the workflow around it) raises with a secret in its text: the REST
    answer, every event over WebSocket and SSE, the session snapshot and /metrics hold
    only the friendly message and a reference; the log holds the secret."""
    if where == "agent":
        agents.failure = RuntimeError(f"upstream refused api_key={SECRET}")
    else:  # the workflow's own catch-all, outside any agent
        agents.workflow_failure = KeyError(f"password={SECRET}")
    server = await start()
    caplog.set_level(logging.INFO)

    async with http.post(
        url(server, "/api/orchestrator/run-workflow?wait=true"),
        json={"strategy_description": "chairs"},
    ) as response:
        assert response.status == 200
        text = await response.text()
        session_id = (await response.json())["session_id"]
    seen = [text]
    async with http.ws_connect(ws_url(server, session_id)) as ws:
        events = await read_until_final(ws)
    assert events[-1]["type"] == "error" and events[-1]["final"] is True
    assert "Reference" in events[-1]["details"]
    seen += [str(event) for event in events]
    for path in (
        sse_url(server, session_id),
        url(server, f"/api/sessions/{session_id}"),
        url(server, "/metrics"),
    ):
        async with http.get(path) as response:
            seen.append(await response.text())

    assert not any(SECRET in item for item in seen)
    assert SECRET in caplog.text


async def test_no_response_names_the_server_software(
    start: StartServer, http: ClientSession
) -> None:
    """aiohttp's ``Server: Python/3.x aiohttp/3.x`` tells an attacker what to look up: no
    answer carries it, whether a REST body, an error, an SSE stream or a WebSocket
    handshake."""
    server = await start()
    session_id = "no-server-header"
    seen = []
    for path in (
        "/healthz",
        f"/api/sessions/{session_id}",  # 404, the JSON error shape
        "/no/such/route",
    ):
        async with http.get(url(server, path)) as response:
            seen.append(response.headers)
    async with http.post(
        url(server, f"/api/sessions/{session_id}/events"),
        json={"type": "progress", "agent": "orchestrator", "status": "step", "progress": 10},
    ) as response:
        assert response.status == 202
        seen.append(response.headers)
    async with http.get(sse_url(server, session_id)) as response:
        assert response.status == 200
        seen.append(response.headers)
    async with http.ws_connect(ws_url(server, session_id)) as ws:
        assert ws._response is not None
        seen.append(ws._response.headers)
    assert len(seen) == 6
    assert not [headers["Server"] for headers in seen if "Server" in headers]
