"""The servers under test, and how to start, wait for and stop each one.

To add a server (the Redis rows, say), add a :class:`ServerSpec` to
:data:`SERVERS`: its command line, the transports it serves, and an
``unavailable`` check that says why it cannot run here (then its rows are
skipped with that reason, not failed).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0  # the server is pinned here; the load generator to the other core
LOADGEN_CPU = 1
JSON = dict[str, Any]


def _available() -> str | None:
    return None


def _redis_broker_unavailable(url: str) -> str | None:
    """The ``--broker redis`` flag exists and a Redis answers at ``url``."""
    try:
        help_text = subprocess.run(
            [sys.executable, "-m", "server", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except subprocess.TimeoutExpired:
        return "python -m server --help timed out"
    if "--broker" not in help_text:
        return "the server has no --broker flag yet"
    where = urllib.parse.urlsplit(url)
    address = (where.hostname or "127.0.0.1", where.port or 6379)
    try:
        with socket.create_connection(address, timeout=2.0):
            pass
    except OSError:
        return f"no Redis on {address[0]}:{address[1]}"
    return None


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: Callable[[int], list[str]]
    transports: frozenset[str] = frozenset({"ws", "sse"})
    replay: bool = False
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)
    unavailable: Callable[[], str | None] = _available
    scenarios: frozenset[str] | None = None  # None: every scenario
    broker: str | None = None  # ours' "memory" or "redis"; None: a peer, which runs no workflows
    cwd: Path = ROOT  # ``ours@REV`` runs a copy of server/ as of REV from here


def _uvloop_unavailable() -> str | None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "uvloop is not installed (pip install uvloop)"
    return None


# ``NAME+variant`` suffixes: one run-time change applied by bench/variant.py.
VARIANTS: dict[str, tuple[list[str], Callable[[], str | None]]] = {
    "uvloop": (["--uvloop"], _uvloop_unavailable),
    "backlog": (["--backlog", "4096"], _available),
    "gcfreeze": (["--gc-freeze"], _available),
    "gclog": (["--gc-log"], _available),
}


def resolve(name: str) -> ServerSpec:
    """A server by name.

    ``ours@REV`` (any git revision) is our server as of that commit, so that one
    change can be measured against the one before it in the same run. Suffixes
    apply one run-time change from outside the code (:mod:`bench.variant`):
    ``+uvloop``, ``+backlog`` (listen queue 4096), ``+gcfreeze``; they combine,
    as in ``ours@HEAD+backlog+gcfreeze``.
    """
    base_name, *suffixes = name.split("+")
    if suffixes:
        spec = resolve(base_name)
        unknown = [v for v in suffixes if v not in VARIANTS]
        if unknown:
            raise ValueError(f"{name}: unknown variant {unknown[0]!r}")
        if spec.command(0)[1] != "-m":
            raise ValueError(f"{name}: only module servers take variants")
        flags = [flag for v in suffixes for flag in VARIANTS[v][0]]
        checks = [VARIANTS[v][1] for v in suffixes]

        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "bench.variant", *flags, *spec.command(port)[2:]]

        def unavailable() -> str | None:
            return spec.unavailable() or next((r for c in checks if (r := c())), None)

        # bench/ must be importable from an ``ours@REV`` copy's folder too.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return replace(
            spec,
            name=name,
            command=command,
            env={**spec.env, "PYTHONPATH": path},
            note=f"{spec.note}, with {' + '.join(suffixes)}",
            unavailable=unavailable,
        )
    base, _, rev = name.partition("@")
    spec = SERVERS[base]
    if not rev:
        return spec
    commit = _git("rev-parse", "--short=10", f"{rev}^{{commit}}")
    where = ROOT / "bench" / "results" / "revs" / commit
    if not (where / "server" / "__main__.py").exists():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "server"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
        # Not every revision tracked the demo page's folder; the app wants it to exist.
        (where / "server" / "static").mkdir(exist_ok=True)
    return replace(spec, name=name, cwd=where, note=f"{spec.note} as of {commit}")


def pin_revision(name: str) -> str:
    """``ours@HEAD+uvloop`` -> ``ours@1a2b3c4d5e+uvloop``: a run measures one commit
    throughout, however the branch moves meanwhile."""
    base, at, rest = name.partition("@")
    if not at:
        return name
    rev, plus, suffix = rest.partition("+")
    return f"{base}@{_git('rev-parse', '--short=10', f'{rev}^{{commit}}')}{plus}{suffix}"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def source_revision() -> JSON:
    """Which server/ the plain ``ours`` runs: HEAD, and whether server/ has local changes."""
    try:
        return {
            "head": _git("rev-parse", "--short=10", "HEAD"),
            "server_dirty": bool(_git("status", "--porcelain", "--", "server")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"head": None, "server_dirty": None}


def _ours(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server", "--port", str(port), "--log-level", "WARNING", *extra]


# The Redis of the ours-redis rows unless --redis-url names another (the server's default).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# The scenarios need 1,000 subscribers on one session and 10,000 streams (issue 7), above
# the server's default admission limits. Given as environment variables, which revisions
# that predate a setting simply ignore (a flag they do not know would stop them).
OURS_ENV = {
    "ORCHESTRATOR_MAX_CONNECTIONS": "20000",
    "ORCHESTRATOR_MAX_CONNECTIONS_PER_SESSION": "5000",
    "ORCHESTRATOR_MAX_SESSIONS": "20000",
}


def _ours_redis(url: str) -> ServerSpec:
    """Ours with the Redis broker, on the Redis at ``url``."""
    return ServerSpec(
        "ours-redis",
        lambda port: _ours(port, "--broker", "redis"),
        replay=True,
        note=f"server/ with --broker redis ({url})",
        env={**OURS_ENV, "ORCHESTRATOR_REDIS_URL": url},
        unavailable=lambda: _redis_broker_unavailable(url),
        scenarios=frozenset({"fanout", "sessions", "fanout_sse", "sessions_sse", "sessions_held"}),
        broker="redis",
    )


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "ours",
            lambda port: _ours(port),
            replay=True,
            note="server/ (memory broker), admission limits raised to fit the scenarios",
            env=OURS_ENV,
            broker="memory",
        ),
        ServerSpec(
            "naive",
            lambda port: [sys.executable, "-m", "bench.peers.naive_aiohttp", "--port", str(port)],
            note="bench/peers/naive_aiohttp.py: no buffer, replay or validation",
        ),
        ServerSpec(
            "seed",
            lambda port: [sys.executable, "-m", "bench.peers.seed_fastapi", "--port", str(port)],
            transports=frozenset({"ws"}),
            note="bench/peers/seed_fastapi.py: FastAPI+uvicorn, one WebSocket per session",
        ),
        ServerSpec(
            "floor",
            lambda port: [sys.executable, "-m", "bench.peers.floor_aiohttp", "--port", str(port)],
            note="bench/peers/floor_aiohttp.py: one shared pre-built frame per event, "
            "transport.write to each subscriber (a lower bound, not a design)",
        ),
        _ours_redis(DEFAULT_REDIS_URL),
    )
}
DEFAULT_SERVERS = ("ours", "naive", "seed")


def use_redis(url: str) -> None:
    """``--redis-url``: the Redis of the ``ours-redis`` rows (and of their lease holder)."""
    SERVERS["ours-redis"] = _ours_redis(url)


# ``--nice``: scheduling priority of the server and load generator (a negative value,
# as root, keeps other work on a shared machine from preempting them mid-measurement).
NICE = {"value": 0}


def pinned(cpu: int) -> Callable[[], None]:
    """A ``preexec_fn``: pin the child to ``cpu`` (when the machine has it), apply
    ``NICE`` and lift its open-files limit to the hard limit."""
    nice = NICE["value"]

    def setup() -> None:
        if cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(0, {cpu})
        if nice:
            os.nice(nice)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(
    spec: ServerSpec, log_path: Path, ready_timeout: float = 60.0
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start ``spec`` on a free port, pinned to SERVER_CPU; always stop it on exit."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            spec.command(port),
            cwd=spec.cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **spec.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pinned(SERVER_CPU),
        )
    try:
        _wait_ready(process, port, ready_timeout)
        yield process, port
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _wait_ready(process: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready on port {port} within {timeout} s")
