"""Helpers of the hardening tests: fake agents, metric samples, bounded waits, raw clients.

Raw clients speak HTTP and WebSocket by hand over asyncio streams, so a test can stop
reading, or drop the TCP connection with ``transport.abort()``, exactly when it wants.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp.test_utils import BaseTestServer
from prometheus_client.parser import text_string_to_metric_families

from server.agents.demand import DemandForecast
from server.agents.handoff import AgentHandoffManager, Reporter
from server.agents.parameters import ExtractionResult, ForecastParameters
from server.context import STREAM_CONTEXT, StreamContext
from server.messages import ProgressEvent
from tests.clients import app_of
from tests.timing import EVENT_TIMEOUT

POLL = 0.01  # how often a bounded wait re-checks its condition


def new_session_id() -> str:
    return str(uuid.uuid4())


def context_of(server: BaseTestServer) -> StreamContext:
    app = app_of(server)
    return app[STREAM_CONTEXT]


def metric(ctx: StreamContext, name: str, **labels: str) -> float:
    """One sample of the app's ``/metrics`` exposition (0.0 when absent)."""
    text = ctx.metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def open_connections(ctx: StreamContext) -> float:
    return sum(metric(ctx, "orchestrator_connections", transport=t) for t in ("websocket", "sse"))


async def wait_until(
    condition: Callable[[], bool],
    timeout: float = EVENT_TIMEOUT,
    state: Callable[[], object] | None = None,
) -> None:
    """Poll a real condition until it holds; fail after ``timeout`` seconds, showing
    ``state()`` (what the condition looks at) when given."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(POLL)
    except TimeoutError:
        if state is None:
            raise
        raise AssertionError(f"still not there after {timeout}s: {state()}") from None


def rss_bytes() -> int:
    """Resident set size of this process (server and clients of in-process tests)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- fake agents --------------------------------------------------------------------------------


class Result:
    """Stands in for an agent's pydantic result: attributes, ``model_dump`` and ``summary``."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)
        self._fields = fields

    def model_dump(self, mode: str = "python") -> dict[str, Any]:
        return {k: v.model_dump() if isinstance(v, Result) else v for k, v in self._fields.items()}

    def summary(self) -> dict[str, Any]:
        return {}


class _Exploding:
    """A result whose ``parameters`` cannot be read."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    @property
    def parameters(self) -> Any:
        raise self._error

    def summary(self) -> dict[str, Any]:
        return {}


class _Forecast(DemandForecast):
    def summary(self) -> dict[str, Any]:
        return {}


class FakeAgents:
    """The four agents of the workflow, instant unless told otherwise.

    ``gate``: when set, the demand agent waits for it (a workflow that keeps running);
    ``started`` is set when it begins to wait, ``stopped`` if that wait is cancelled (the
    work was stopped).
    ``failure``: when set, the demand agent raises it.
    ``workflow_failure``: when set, the workflow itself (not an agent) raises it, on
    reading the extraction's result.
    """

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()  # the demand agent is at its gate
        self.stopped = asyncio.Event()
        self.failure: Exception | None = None
        self.workflow_failure: Exception | None = None

    def __call__(self, handoff: AgentHandoffManager) -> FakeAgents:
        handoff.register("extraction", self._extraction)
        handoff.register("demand", self._demand)
        handoff.register("inventory", self._plain)
        handoff.register("pricing", self._plain)
        return self

    async def close(self) -> None:
        pass

    async def _extraction(self, strategy: str, report: Reporter) -> Any:
        await report("Reading", 50)
        if self.workflow_failure is not None:
            return _Exploding(self.workflow_failure)
        return ExtractionResult(parameters=ForecastParameters(), method="rules")

    async def _demand(self, parameters: Any, report: Reporter) -> DemandForecast:
        await report("Forecasting", 10)
        if self.gate is not None:
            self.started.set()
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.stopped.set()
                raise
        if self.failure is not None:
            raise self.failure
        # Unvalidated on purpose: the workflow only passes it on and dumps it.
        return _Forecast.model_construct(products=[], horizon_weeks=1)

    async def _plain(self, request: Any, report: Reporter) -> Result:
        return Result(items=[])


# --- raw clients ----------------------------------------------------------------------------------


class RawConnection:
    """One TCP connection to the server, spoken by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, server: BaseTestServer, *, receive_buffer: int | None = None
    ) -> RawConnection:
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # A tiny receive window: a client that stops reading backs the server up at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (str(server.host), server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def request_head(
        self, path: str, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Send a GET and read the status line and headers."""
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(EVENT_TIMEOUT):
            head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parsed = dict(line.split(": ", 1) for line in header_lines if ": " in line)
        return {"status": int(status_line.split()[1]), "headers": parsed}

    def post(self, path: str, body: Any) -> None:
        """Send a POST of ``body`` as JSON, without waiting for its answer."""
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)

    async def websocket(self, path: str) -> int:
        """A WebSocket handshake; returns the HTTP status (101 when upgraded)."""
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        head = await self.request_head(
            path,
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": key,
                "Sec-WebSocket-Version": "13",
            },
        )
        return int(head["status"])

    def abort(self) -> None:
        """Drop the connection with no close handshake (and an RST)."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def events_in(sse_text: str) -> list[dict[str, Any]]:
    """Every event of an SSE byte stream decoded to text (``data:`` lines, JSON)."""
    return [
        json.loads(line[len("data: ") :])
        for line in sse_text.splitlines()
        if line.startswith("data: ")
    ]


@contextlib.asynccontextmanager
async def stalled_sse_client(
    server: BaseTestServer, session_id: str, *, padding: str, limit: int
) -> AsyncIterator[RawConnection]:
    """An SSE client of ``session_id`` that has stopped reading, with its stream backed up:
    events were published until the kernel's buffers were full and the server's socket
    held bytes of its own (at most ``limit`` events, well under the subscriber's queue,
    which would cut it off). The connection is dropped on the way out."""
    ctx = context_of(server)
    slow = await RawConnection.open(server, receive_buffer=4096)
    try:
        head = await slow.request_head(f"/sse/orchestrator/{session_id}")
        assert head["status"] == 200
        await wait_until(lambda: ctx.hub.subscriber_count == 1)
        [stream] = [s for s in ctx.streams if s.session_id == session_id]
        published = 0
        while not stream.backlog:
            assert published < limit, "the kernel took every byte"
            await ctx.hub.publish(
                ProgressEvent(
                    session_id=session_id, agent="demand", status=padding, progress=published % 101
                )
            )
            published += 1
            await asyncio.sleep(0)  # the stream's task sends what was queued
        yield slow
    finally:
        slow.abort()
