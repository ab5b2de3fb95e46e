"""Real server processes for the multi-process tests: ``python -m server --broker redis``
on free ports of 127.0.0.1, sharing one Redis and one key prefix.

Each process is started in a session of its own (``start_new_session``), so that its
forecast worker processes share its process group: a test may SIGKILL the server alone
(its workers are orphaned, as in a real crash), and the fixture's teardown still ends
every process of the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import ClientConnectionError, ClientPayloadError, ClientSession

from server.config import ENV_PREFIX
from tests.clients import Event, EventStream, WSClient, read_until
from tests.redis_support import free_port
from tests.timing import EVENT_TIMEOUT, POLL_INTERVAL, SERVER_START_TIMEOUT, SERVER_STOP_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
STRATEGY = "15% off outdoor furniture for 8 weeks"

LEASE_TTL = 3.0  # seconds: how soon the others notice a dead workflow process (short for tests)
LEASE_CHECK_INTERVAL = 0.25
# "Within a bounded time": the lease lapses, a monitor looks, its final event travels.
INTERRUPTION_BOUND = LEASE_TTL + LEASE_CHECK_INTERVAL + EVENT_TIMEOUT

_FOREIGN = ("OPENAI_", "AZURE_OPENAI_")  # the rule-based extraction, whatever the machine has


def server_environ() -> dict[str, str]:
    """This environment without ``ORCHESTRATOR_*`` or language-model variables."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(ENV_PREFIX) and not k.startswith(_FOREIGN)
    }


class ServerProcess:
    """One ``python -m server`` process, its port and its log."""

    def __init__(
        self,
        name: str,
        redis_url: str,
        prefix: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.env = {**server_environ(), **(env or {})}
        self.port = free_port()
        self.log = log_dir / f"server-{name}.log"
        self.args = [
            "--port", str(self.port),
            "--broker", "redis",
            "--redis-url", redis_url,
            "--redis-key-prefix", prefix,
            "--lease-ttl", str(LEASE_TTL),
            "--lease-check-interval", str(LEASE_CHECK_INTERVAL),
            "--shutdown-grace", "0",
            "--log-format", "json",
        ]  # fmt: skip
        self.process: asyncio.subprocess.Process | None = None

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://{HOST}:{self.port}{path}"

    def ws(self, session_id: str, last_event_id: str | None = None) -> str:
        query = f"?last_event_id={last_event_id}" if last_event_id else ""
        return self.url(f"/ws/orchestrator/{session_id}{query}", "ws")

    def sse(self, session_id: str) -> str:
        return self.url(f"/sse/orchestrator/{session_id}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server", *self.args,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                start_new_session=True,
            )  # fmt: skip

    async def wait_ready(self, http: ClientSession) -> None:
        """Poll ``/readyz`` until it answers 200 (the process serves and reaches Redis)."""
        try:
            async with asyncio.timeout(SERVER_START_TIMEOUT):
                while True:
                    assert self.running, f"{self.name} exited:\n{self.log_text()}"
                    with contextlib.suppress(ClientConnectionError):
                        async with http.get(self.url("/readyz")) as response:
                            if response.status == 200:
                                return
                    await asyncio.sleep(POLL_INTERVAL)
        except TimeoutError:
            raise AssertionError(f"{self.name} never got ready:\n{self.log_text()}") from None

    def kill(self) -> None:
        """SIGKILL the server process alone (its worker processes are orphaned)."""
        assert self.process is not None and self.process.returncode is None
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM (then SIGKILL if it lingers), and end whatever is left of its group."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(SERVER_STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # its group: orphaned forecast workers

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (``--log-format json``)."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return [json.loads(line) for line in lines if line.startswith("{")]


async def subscribed_ws(ws: WSClient) -> None:
    """Return once the server has subscribed this WebSocket: its answer to a ping comes
    from the subscription, which exists only once replay and live delivery are set up."""
    await ws.send_text('{"type": "ping"}')
    await read_until(ws, lambda event: event["type"] == "heartbeat")


async def run_workflow(http: ClientSession, server: ServerProcess, session_id: str) -> None:
    async with http.post(
        server.url("/api/orchestrator/run-workflow"),
        json={"strategy_description": STRATEGY, "session_id": session_id},
    ) as response:
        assert response.status == 202, await response.text()


async def read_until_dropped(stream: EventStream) -> list[Event]:
    """Every event until the stream ends or its connection drops (its server was killed:
    an SSE response then ends without its last chunk)."""
    events: list[Event] = []
    try:
        while (event := await stream.next_event(EVENT_TIMEOUT)) is not None:
            events.append(event)
    except (ClientPayloadError, ClientConnectionError):
        pass
    return events


def demand_started(event: dict[str, Any]) -> bool:
    return event.get("agent") == "demand" and event["type"] == "agent_status"
