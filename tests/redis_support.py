"""A ``redis-server`` the tests control, shared by every Redis test (broker, hub, transport,
end-to-end and multi-process ones).

Where Redis comes from:

* ``REDIS_URL`` set: that server (tests that stop and restart Redis are skipped,
  since they cannot stop a server they did not start);
* else a ``redis-server`` binary on ``PATH``: the tests start their own on a
  free port in a temporary directory, without persistence;
* else the Redis tests are skipped, unless ``REQUIRE_REDIS=1`` (CI), which
  turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

SERVER_START_TIMEOUT = 10.0  # a redis-server answers PING within this after it is started


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


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the certificate is its own CA)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        redis_unavailable("no openssl binary on PATH to make a certificate for TLS")
    certificate, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(certificate),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate, key


class RedisServer:
    """A ``redis-server`` of our own, without persistence, that a test may stop and
    start: it always comes back empty, on the same port. With ``tls``, :attr:`url` is a
    ``rediss://`` URL on a TLS port (a plain port stays open for the readiness check)."""

    def __init__(
        self, binary: str, directory: Path, password: str | None = None, tls: bool = False
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.tls = self_signed_certificate(directory) if tls else None
        self.tls_port = free_port() if tls else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            certificate = self.tls[0]
            return f"rediss://{auth}127.0.0.1:{self.tls_port}/0?ssl_ca_certs={certificate}"
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
        if self.tls is not None:
            certificate, key = self.tls
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(certificate),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(certificate),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
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


class ServerFactory(Protocol):
    """The ``own_redis`` fixture: start a dedicated server."""

    def __call__(self, password: str | None = None, tls: bool = False) -> RedisServer: ...
