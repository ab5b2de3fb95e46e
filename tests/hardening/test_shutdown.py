"""Graceful shutdown: a real ``python -m server`` process gets SIGTERM or SIGINT while a
workflow runs and clients stream; and the grace period, in process."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientConnectorError, ClientSession, ClientWebSocketResponse
from aiohttp.test_utils import BaseTestServer

from server.api import WORKFLOW_RUNNER
from server.app import STATIC_DIR
from tests.clients import app_of
from tests.hardening.clients import assert_error_body, next_event, read_until_final, url
from tests.hardening.conftest import StartServer
from tests.hardening.support import (
    FakeAgents,
    RawConnection,
    context_of,
    events_in,
    new_session_id,
    open_connections,
    stalled_sse_client,
    wait_until,
)
from tests.timing import EVENT_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
GRACE = 1.0
START_TIMEOUT = 30.0  # imports included, on a loaded machine
EXIT_SLACK = 8.0  # "within the grace period plus a few seconds"
GOING_AWAY = 1001
NORMAL = 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Process]]]:
    """Start ``python -m server`` on a free port and wait until it answers /healthz."""
    started: list[Process] = []

    async def factory(*args: str) -> Process:
        port = free_port()
        log = tmp_path / f"server-{port}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "server",
                "--port",
                str(port),
                *args,
                cwd=ROOT,
                stdout=sink,
                stderr=sink,
            )
        server = Process(process, port, log)
        started.append(server)
        async with ClientSession() as http, asyncio.timeout(START_TIMEOUT):
            while True:
                try:
                    async with http.get(server.url("/healthz")) as response:
                        if response.status == 200:
                            return server
                except ClientConnectorError:
                    pass
                assert process.returncode is None, log.read_text()
                await asyncio.sleep(0.05)

    yield factory
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


async def read_sse(http: ClientSession, target: str) -> tuple[asyncio.Task[str], asyncio.Event]:
    """Read an SSE stream to its end in a task; the event is set once the stream has begun."""
    began = asyncio.Event()

    async def read() -> str:
        async with http.get(target) as response:
            assert response.status == 200
            chunks = [await response.content.readline()]
            began.set()
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
            return b"".join(chunks).decode()

    return asyncio.create_task(read()), began


async def until_event(ws: ClientWebSocketResponse, predicate: Callable[[Any], bool]) -> None:
    while True:
        event = await next_event(ws)
        assert event is not None, "closed early"
        if predicate(event):
            return


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_ends_workflows_then_streams_and_the_process_exits_in_time(
    serve: Callable[..., Awaitable[Process]], signum: int
) -> None:
    """On SIGTERM/SIGINT the server stops accepting; the running workflow gets the grace
    period, then its subscribers get its final event (``workflow_interrupted``, or
    ``complete`` had it finished) and 1000 / end of stream; subscribers of other sessions
    get 1001 / end of stream; the process exits with 0 within grace + a few seconds."""
    server = await serve("--shutdown-grace", str(GRACE), "--log-format", "json")
    idle = new_session_id()
    async with ClientSession() as http:
        async with http.post(
            server.url("/api/orchestrator/run-workflow"),
            json={"strategy_description": "15% off outdoor furniture for 8 weeks"},
        ) as response:
            assert response.status == 202
            running = (await response.json())["session_id"]
        running_sse, running_began = await read_sse(
            http, server.url(f"/sse/orchestrator/{running}")
        )
        idle_sse, idle_began = await read_sse(http, server.url(f"/sse/orchestrator/{idle}"))
        async with (
            http.ws_connect(server.url(f"/ws/orchestrator/{running}", "ws")) as running_ws,
            http.ws_connect(server.url(f"/ws/orchestrator/{idle}", "ws")) as idle_ws,
        ):
            # The demand agent has started: the workflow is mid-flight.
            await until_event(running_ws, lambda e: e.get("agent") == "demand")
            await asyncio.wait_for(running_began.wait(), EVENT_TIMEOUT)
            await asyncio.wait_for(idle_began.wait(), EVENT_TIMEOUT)

            signalled = time.monotonic()
            server.process.send_signal(signum)

            rest = await read_until_final(running_ws)
            final = rest[-1]
            assert final["final"] is True
            assert final["type"] == "complete" or final["code"] == "workflow_interrupted", final
            assert running_ws.close_code == NORMAL
            assert await next_event(idle_ws) is None
            assert idle_ws.close_code == GOING_AWAY

        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(EVENT_TIMEOUT):
            running_text, idle_text = await running_sse, await idle_sse
    assert events_in(running_text)[-1] == final
    assert not any(e.get("final") for e in events_in(idle_text))

    try:
        async with asyncio.timeout(GRACE + EXIT_SLACK):
            code = await server.process.wait()
    except TimeoutError:
        # The server's watchdog has written every thread's stack to its log by now.
        pytest.fail(f"the server did not exit in time; its log:\n{server.log.read_text()}")
    assert code == 0
    took = time.monotonic() - signalled
    assert took < GRACE + EXIT_SLACK

    lines = server.log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # --log-format json: every line is JSON
    assert any(r.get("session_id") == running for r in records), lines


async def refused(port: int) -> None:
    """Wait until the port refuses connections: the server's shutdown has begun."""
    async with asyncio.timeout(EVENT_TIMEOUT):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                return
            writer.close()
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "again",
    [None, signal.SIGTERM, signal.SIGINT],
    ids=["one SIGTERM", "then SIGTERM again", "then SIGINT (a second Ctrl+C)"],
)
async def test_a_request_waiting_on_its_workflow_is_answered_when_shutdown_interrupts_it(
    serve: Callable[..., Awaitable[Process]], again: int | None
) -> None:
    """``run-workflow?wait=true`` still waiting when SIGTERM comes: once the grace period
    is over, the request gets its answer, 200 with the final outcome (``failed`` and
    ``workflow_interrupted``, or ``complete`` had it finished), not a dropped connection.
    A second signal while the shutdown runs changes nothing but a line in the log."""
    server = await serve("--shutdown-grace", str(GRACE))
    session_id = new_session_id()
    async with ClientSession() as http:
        waiting = asyncio.create_task(
            http.post(
                server.url("/api/orchestrator/run-workflow?wait=true"),
                json={"strategy_description": "15% off outdoor furniture for 8 weeks",
                      "session_id": session_id},
            )
        )  # fmt: skip
        async with http.ws_connect(server.url(f"/ws/orchestrator/{session_id}", "ws")) as ws:
            await until_event(ws, lambda e: e.get("agent") == "demand")  # mid-flight
            server.process.send_signal(signal.SIGTERM)
            if again is not None:
                await refused(server.port)
                server.process.send_signal(again)
            final = (await read_until_final(ws))[-1]
        async with asyncio.timeout(GRACE + EXIT_SLACK):
            response = await waiting
        async with response:
            assert response.status == 200
            answer = await response.json()
    if final["type"] == "complete":
        assert answer["status"] == "complete"
    else:
        assert answer["status"] == "failed"
        assert answer["error"]["code"] == final["code"] == "workflow_interrupted"
    assert await server.process.wait() == 0
    if again is not None:
        assert "shutdown is already under way" in server.log.read_text()


async def a_workflow_in_its_grace(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> tuple[BaseTestServer, str, asyncio.Event]:
    """A server with a long grace period, running a workflow that waits for the returned
    gate (so that a shutdown spends its grace on it); and that workflow's session id."""
    agents.gate = gate = asyncio.Event()
    server = await start(shutdown_grace=60.0)
    async with http.post(
        url(server, "/api/orchestrator/run-workflow"), json={"strategy_description": "chairs"}
    ) as response:
        assert response.status == 202
        session_id: str = (await response.json())["session_id"]
    return server, session_id, gate


async def test_a_workflow_that_finishes_within_the_grace_period_completes(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> None:
    """During the grace period the workflow runs on and ends with ``complete``; a new
    workflow is refused with 503 ``shutting_down``; shutdown returns once it has ended."""
    server, session_id, gate = await a_workflow_in_its_grace(start, http, agents)
    async with http.ws_connect(url(server, f"/ws/orchestrator/{session_id}", "ws")) as ws:
        await until_event(ws, lambda e: e.get("agent") == "demand")
        shutdown = asyncio.create_task(app_of(server).shutdown())
        await wait_until(lambda: app_of(server)[WORKFLOW_RUNNER].closing)
        async with http.post(
            url(server, "/api/orchestrator/run-workflow"), json={"strategy_description": "x"}
        ) as response:
            assert response.status == 503
            assert response.headers["Retry-After"]
            assert_error_body(await response.json(), "shutting_down")
        assert not shutdown.done()
        gate.set()
        events = await read_until_final(ws)
    assert events[-1]["type"] == "complete" and events[-1]["final"] is True
    async with asyncio.timeout(EVENT_TIMEOUT):
        await shutdown
    assert context_of(server).hub.subscriber_count == 0


async def test_idle_keep_alive_connections_are_closed_when_shutdown_begins(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> None:
    """A REST connection kept alive between requests, or opened and not used yet, is closed
    as shutdown begins, while a workflow still runs its grace period: its client's next
    request fails as a closed connection and goes to another process, where aiohttp alone
    would leave the socket open and drop that request unanswered until the grace is over.
    A stream opened on a connection that served a request before is not cut (it ends
    with the others)."""
    server, session_id, gate = await a_workflow_in_its_grace(start, http, agents)
    idle, reused = await RawConnection.open(server), await RawConnection.open(server)
    for connection in (idle, reused):
        head = await connection.request_head("/healthz")
        assert head["status"] == 200
        await connection.reader.readexactly(int(head["headers"]["Content-Length"]))
    assert await reused.websocket(f"/ws/orchestrator/{session_id}") == 101
    fresh = await RawConnection.open(server)
    await wait_until(lambda: accepted(server, fresh))
    try:
        closing = asyncio.create_task(server.close())
        await wait_until(lambda: app_of(server)[WORKFLOW_RUNNER].closing)
        async with asyncio.timeout(EVENT_TIMEOUT):
            assert await idle.reader.read() == b""  # closed, while the workflow runs on
            assert await fresh.reader.read() == b""
        assert not closing.done()
        assert not reused.writer.transport.is_closing()
        assert not reused.reader.at_eof()
    finally:
        gate.set()
        await idle.close()
        await fresh.close()
        reused.abort()
    async with asyncio.timeout(EVENT_TIMEOUT):
        await closing


def aiohttp_connections(server: BaseTestServer) -> list[Any]:
    """aiohttp's request handlers, one per connection it has (not the streams')."""
    assert server.runner is not None and server.runner.server is not None
    return list(server.runner.server.connections)


def accepted(server: BaseTestServer, connection: RawConnection) -> bool:
    """aiohttp has this connection among its own."""
    ours = connection.writer.get_extra_info("sockname")
    return any(
        h.transport is not None and h.transport.get_extra_info("peername") == ours
        for h in aiohttp_connections(server)
    )


async def test_a_file_still_being_sent_when_shutdown_begins_arrives_whole(
    start: StartServer, http: ClientSession, agents: FakeAgents
) -> None:
    """A response still on its way when shutdown begins (a static file sent with sendfile
    to a client that reads slowly) is not taken for an idle connection: it arrives whole."""
    server, _, gate = await a_workflow_in_its_grace(start, http, agents)
    expected = (STATIC_DIR / "app.js").read_bytes()
    slow = await RawConnection.open(server, receive_buffer=1024)
    await wait_until(lambda: accepted(server, slow))
    for handler in aiohttp_connections(server):  # small buffers both ways: sendfile waits
        handler.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
    head = await slow.request_head("/static/app.js")
    assert head["status"] == 200 and int(head["headers"]["Content-Length"]) == len(expected)
    # Its response is still being sent (sendfile waits for the client to read).
    busy = [h for h in aiohttp_connections(server) if h._request_in_progress]
    peers = [h.transport.get_extra_info("peername") for h in busy]
    assert peers == [slow.writer.get_extra_info("sockname")]
    try:
        closing = asyncio.create_task(server.close())
        await wait_until(lambda: app_of(server)[WORKFLOW_RUNNER].closing)
        async with asyncio.timeout(EVENT_TIMEOUT):
            assert await slow.reader.readexactly(len(expected)) == expected
    finally:
        gate.set()
        await slow.close()
    async with asyncio.timeout(EVENT_TIMEOUT):
        await closing


async def test_aiohttp_still_has_what_closing_idle_connections_rests_on(
    start: StartServer, http: ClientSession
) -> None:
    """server/keep_alives.py reads aiohttp's request handlers' private state: if aiohttp
    changes it, this fails at once (and the shutdown tests above with it)."""
    server = await start()
    async with http.get(url(server, "/healthz")) as response:
        assert response.status == 200
    handlers = aiohttp_connections(server)
    assert handlers
    for handler in handlers:
        assert handler._manager is server.runner.server  # type: ignore[union-attr]
        assert handler._request_in_progress is False
        assert not handler._messages
        task = handler._task_handler
        assert handler._waiter is not None or task is None or task.done()


async def test_an_sse_client_that_stopped_reading_does_not_hold_shutdown_up(
    start: StartServer,
) -> None:
    """Shutdown ends every SSE stream and waits for their last bytes to go out (aiohttp no
    longer knows these streams), but a client that has stopped reading gets 2 s: it is
    then dropped, with its subscription, and shutdown returns."""
    server = await start(subscriber_queue_size=50, heartbeat_interval=60.0, buffer_size=100)
    ctx = context_of(server)
    session_id = new_session_id()
    async with stalled_sse_client(server, session_id, padding="x" * 1900, limit=20_000):
        async with asyncio.timeout(2.0 + EVENT_TIMEOUT):
            await app_of(server).shutdown()
        assert open_connections(ctx) == 0
        assert ctx.hub.subscriber_count == 0
