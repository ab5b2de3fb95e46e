"""Test support for the Redis broker: a ``redis-server`` we control, and a recorder
standing in for the hub."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pytest

from server.brokers.redis import RedisBroker
from server.messages import StoredEvent

TIMEOUT = 5.0  # seconds any awaited condition may take before the test fails
SERVER_START_TIMEOUT = 10.0


def redis_unavailable(reason: str) -> NoReturn:
    """Skip, or fail when ``REQUIRE_REDIS=1`` says Redis must be tested."""
    if os.environ.get("REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason} (and REQUIRE_REDIS=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def new_session_id() -> str:
    return f"s-{secrets.token_hex(8)}"


class RedisServer:
    """A ``redis-server`` of our own, without persistence, that a test may stop and
    start: it always comes back empty, on the same port."""

    def __init__(self, binary: str, directory: Path, password: str | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.password = password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        assert not self.running
        log = self.directory / "redis.log"
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(log),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not self._answers_ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                pytest.fail(f"redis-server did not start:\n{tail}", pytrace=False)
            time.sleep(0.02)  # polling for readiness, bounded by the deadline

    def _answers_ping(self) -> bool:
        command = b"PING\r\n"
        if self.password:
            command = f"AUTH {self.password}\r\nPING\r\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(command)
                reply = b""
                while b"PONG" not in reply:
                    chunk = sock.recv(64)
                    if not chunk:
                        return False
                    reply += chunk
                return True
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=SERVER_START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Recorder:
    """The hub's stand-in: records what a broker delivers, and waits for conditions."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: StoredEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, session_id: str) -> list[StoredEvent]:
        return [e for e in self.events if e.session_id == session_id]

    def seqs(self, session_id: str) -> list[int]:
        return [e.seq for e in self.of(session_id)]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Node:
    """One broker as one server process would hold it, with what it delivered."""

    broker: RedisBroker
    recorder: Recorder


class ServerFactory(Protocol):
    """The ``own_redis`` fixture: start a dedicated server."""

    def __call__(self, password: str | None = None) -> RedisServer: ...


class NodeFactory(Protocol):
    """The ``make_node`` fixture: a started broker ("process") with its recorder."""

    async def __call__(self, url: str | None = None, **options: Any) -> Node: ...


async def eventually(check: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Poll a condition that announces nothing (a key expiring, a server coming back)
    until it holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
