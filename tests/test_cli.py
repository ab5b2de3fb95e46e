"""``python -m server``: flags, their ``ORCHESTRATOR_*`` environment variables, and a real
server process that serves and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
from aiohttp import ClientConnectionError, ClientSession, TCPConnector

from server.config import ENV_PREFIX, Settings
from tests.clients import (
    new_session_id,
    open_aiohttp_sse,
    open_aiohttp_ws,
    read_events,
    read_to_end,
)
from tests.timing import (
    EVENT_TIMEOUT,
    POLL_INTERVAL,
    SERVER_START_TIMEOUT,
    SERVER_STOP_TIMEOUT,
)

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_FLAGS = (
    "host",
    "port",
    "heartbeat_interval",
    "buffer_size",
    "session_ttl",
    "log_level",
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any ``ORCHESTRATOR_*`` variable, plus ``extra``
    (and a wide terminal, so argparse wraps the help less)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return {**environ, "COLUMNS": "400", **extra}


async def run_cli(*args: str, environ: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m server <args>`` to completion: exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", *args,
        cwd=ROOT,
        env=dict(environ or clean_environ()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(SERVER_START_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def help_entry(help_text: str, name: str) -> str:
    """The ``--help`` entry of the setting ``name``: its option line and the indented lines
    that follow it, with whitespace collapsed."""
    entries: list[list[str]] = []
    for line in help_text.splitlines():
        if line.lstrip().startswith("-"):
            entries.append([line])
        elif entries and line.startswith(" "):
            entries[-1].append(line)
        else:
            entries.append([])
    found = [e for e in entries if e and e[0].lstrip().startswith(flag(name) + " ")]
    assert len(found) == 1, f"{flag(name)} is not listed once in --help"
    return " ".join(" ".join(found[0]).split())


# --- flags and environment --------------------------------------------------------------------


async def test_help_lists_every_setting_with_its_flag_and_environment_variable() -> None:
    """``--help`` lists a flag for every setting, each with its explanation, its
    ``ORCHESTRATOR_<NAME>`` variable and its default; the issue's six flags are among them."""
    status, out, _ = await run_cli("--help")
    assert status == 0
    names = [f.name for f in dataclasses.fields(Settings)]
    assert set(REQUIRED_FLAGS) <= set(names)
    for f in dataclasses.fields(Settings):
        entry = help_entry(out, f.name)
        assert f"[env {env_name(f.name)}]" in entry
        assert " ".join(f.metadata["help"].split()) in entry
        assert "(default: " in entry


async def test_environment_variable_sets_the_default() -> None:
    """``ORCHESTRATOR_<NAME>`` sets a setting's value when no flag is given (``--help``
    shows it as the default)."""
    environ = clean_environ(ORCHESTRATOR_BUFFER_SIZE="77", ORCHESTRATOR_LOG_LEVEL="DEBUG")
    status, out, _ = await run_cli("--help", environ=environ)
    assert status == 0
    assert help_entry(out, "buffer_size").endswith("(default: 77)")
    assert help_entry(out, "log_level").endswith("(default: DEBUG)")


def test_flag_beats_environment_which_beats_the_default() -> None:
    """For every kind of setting (int, float, list, optional text) the flag wins over the
    environment variable, and the variable over the default."""
    environ = {
        "ORCHESTRATOR_PORT": "9001",
        "ORCHESTRATOR_HEARTBEAT_INTERVAL": "2.5",
        "ORCHESTRATOR_CORS_ORIGINS": "http://a.example, http://b.example",
        "ORCHESTRATOR_PUBLISH_TOKEN": "from-env",
    }
    from_env = Settings.from_args([], environ)
    assert (from_env.port, from_env.heartbeat_interval) == (9001, 2.5)
    assert from_env.cors_origins == ("http://a.example", "http://b.example")
    assert from_env.publish_token == "from-env"
    assert from_env.buffer_size == Settings().buffer_size

    argv = ["--port", "9002", "--heartbeat-interval", "7", "--cors-origins", "http://c.example",
            "--publish-token", "from-flag"]  # fmt: skip
    from_flags = Settings.from_args(argv, environ)
    assert (from_flags.port, from_flags.heartbeat_interval) == (9002, 7.0)
    assert from_flags.cors_origins == ("http://c.example",)
    assert from_flags.publish_token == "from-flag"


async def test_invalid_environment_value_is_refused_with_its_name() -> None:
    """An environment variable that does not parse stops the server with status 2 and a
    message naming the variable."""
    status, _, err = await run_cli(environ=clean_environ(ORCHESTRATOR_PORT="eighty"))
    assert status == 2
    assert "ORCHESTRATOR_PORT" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["soon", "nan", "-1"])
async def test_an_invalid_language_model_setting_is_refused_with_its_name(value: str) -> None:
    """A bad ``OPENAI_TIMEOUT`` stops the server at start, with status 2 and one line
    naming it, like any other setting (not a traceback from the app's start-up)."""
    status, _, err = await run_cli(environ=clean_environ(OPENAI_TIMEOUT=value))
    assert status == 2, err
    assert "OPENAI_TIMEOUT" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("variable", "flag"),
    [
        ("ORCHESTRATOR_PUBLISH_TOKEN", "--publish-token"),
        ("ORCHESTRATOR_STREAM_TOKEN_SECRET", "--stream-token-secret"),
    ],
)
async def test_a_secret_set_but_empty_is_refused_with_its_name(variable: str, flag: str) -> None:
    """An empty publish token would let anyone publish with an empty bearer token, and an
    empty stream-token secret would sign tokens anyone can forge: set but empty (as
    ``VAR=${UNSET}`` in a compose file leaves it), by flag or by variable, the server
    refuses to start, with status 2 and a message naming it."""
    for args, environ in (
        ((), clean_environ(**{variable: ""})),
        ((flag, " "), clean_environ()),
    ):
        status, _, err = await run_cli(*args, environ=environ)
        assert status == 2, err
        assert variable in err and flag in err and "set but empty" in err
        assert "Traceback" not in err


async def test_invalid_flag_value_is_refused() -> None:
    """A flag value that does not parse stops the server with status 2 and a usage
    message."""
    status, _, err = await run_cli("--buffer-size", "many")
    assert status == 2
    assert "--buffer-size" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--heartbeat-interval", "0"),  # the heartbeat timer would be a busy loop
        ("--heartbeat-interval", "nan"),
        ("--buffer-size", "0"),  # nothing would be replayed
        ("--sse-retry-ms", "-5"),
        ("--agent-timeout", "-1"),  # every agent would time out at once
        ("--lease-ttl", "0"),  # was a traceback
        ("--max-connections", "0"),
        ("--shutdown-grace", "-1"),
        ("--port", "70000"),  # was a traceback from bind()
    ],
)
def test_a_number_out_of_its_range_is_refused_with_its_name(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sizes, limits and intervals must be above 0 (the port and the shutdown grace may be
    0), and finite: out of range, the server does not start with settings that would serve
    oddly or fail later with a traceback; it stops with status 2 naming the flag and its
    variable."""
    with pytest.raises(SystemExit) as stopped:
        Settings.from_args([flag, value], clean_environ())
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    variable = "ORCHESTRATOR_" + flag.removeprefix("--").replace("-", "_").upper()
    assert flag in err and variable in err and value in err, err
    assert Settings.from_args(["--shutdown-grace", "0", "--port", "0"], clean_environ())


# --- a real server process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def serving(
    *args: str,
    environ: Mapping[str, str],
    log: Path,
    before_exec: Callable[[], None] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m server <args>`` as a subprocess (output to ``log``); killed if the test
    leaves it running. ``before_exec`` runs in the child before the server starts."""
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", *args,
            cwd=ROOT, env=dict(environ), stdout=output, stderr=output,
            preexec_fn=before_exec,
        )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_healthy(
    http: ClientSession, base: str, process: asyncio.subprocess.Process, log: Path
) -> None:
    """Poll ``/healthz`` until it answers 200 (bounded); fail early if the server exits."""
    async with asyncio.timeout(SERVER_START_TIMEOUT):
        while True:
            assert process.returncode is None, f"the server exited:\n{log.read_text()}"
            with contextlib.suppress(ClientConnectionError):
                async with http.get(base + "/healthz") as response:
                    if response.status == 200:
                        assert (await response.json()) == {"status": "ok"}
                        return
            await asyncio.sleep(POLL_INTERVAL * 10)


async def test_server_process_serves_with_env_and_flags_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    """``python -m server`` serves ``/healthz`` on the port its flag names (though
    ``ORCHESTRATOR_PORT`` names another), with a setting taken from the environment
    (the SSE ``retry:``); on SIGTERM it closes WebSocket clients with 1001, ends SSE
    responses, and exits 0."""
    port = free_port()
    log = tmp_path / "server.log"
    with socket.socket() as taken:  # the port the environment names stays busy
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        environ = clean_environ(
            ORCHESTRATOR_PORT=str(taken.getsockname()[1]), ORCHESTRATOR_SSE_RETRY_MS="1234"
        )
        async with (
            serving("--port", str(port), "--host", "127.0.0.1", environ=environ, log=log) as server,
            ClientSession() as http,
        ):
            base = f"http://127.0.0.1:{port}"
            await wait_healthy(http, base, server, log)
            session_id = new_session_id()
            async with (
                open_aiohttp_ws(http, f"ws://127.0.0.1:{port}/ws/orchestrator/{session_id}") as ws,
                open_aiohttp_sse(http, f"{base}/sse/orchestrator/{session_id}") as sse,
            ):
                retry = await sse.next_message()
                assert retry is not None and retry.retry == 1234
                await ws.send_text('{"type": "ping"}')
                assert (await read_events(ws, 1))[0]["type"] == "heartbeat"

                server.send_signal(signal.SIGTERM)
                assert await read_to_end(ws, SERVER_STOP_TIMEOUT) == []
                assert ws.close_code == 1001
                assert await read_to_end(sse, SERVER_STOP_TIMEOUT) == []
            async with asyncio.timeout(SERVER_STOP_TIMEOUT):
                status = await server.wait()
    assert status == 0, log.read_text()
    assert "Traceback" not in log.read_text()


async def test_idle_server_process_exits_0_on_ctrl_c(tmp_path: Path) -> None:
    """An idle server stops with status 0 on SIGINT (Ctrl+C in a terminal), without a
    traceback. At start it logged which model reads strategies, and where (the events
    name the model only)."""
    port = free_port()
    log = tmp_path / "server.log"
    environ = clean_environ(OPENAI_BASE_URL="http://llm.internal:8443/v1", OPENAI_MODEL="llama")
    async with (
        serving("--port", str(port), environ=environ, log=log) as server,
        ClientSession() as http,
    ):
        await wait_healthy(http, f"http://127.0.0.1:{port}", server, log)
        server.send_signal(signal.SIGINT)
        async with asyncio.timeout(SERVER_STOP_TIMEOUT):
            status = await server.wait()
    assert status == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert "strategies are read by llama at http://llm.internal:8443" in log.read_text()


# --- the open-file limit ----------------------------------------------------------------------


def open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    """A ``before_exec``: the limits on open files a shell or a service manager might set."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def serving_under_limit(
    port: int, log: Path, *, hard: int
) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """A server with ``max_connections`` 200, started with a soft limit of 64 open files
    and the ``hard`` limit given."""
    return serving(
        "--port", str(port), "--max-connections", "200",
        environ=clean_environ(), log=log, before_exec=open_files_limit(64, hard),
    )  # fmt: skip


def open_files_limits_of(pid: int) -> tuple[int, int]:
    """The soft and hard limit on open files of a running process (``/proc``)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


async def test_a_low_soft_limit_on_open_files_is_raised_to_hold_max_connections(
    tmp_path: Path,
) -> None:
    """Started with a soft limit of 64 open files (hard 4,096), the server raises its own
    to ``max_connections`` plus headroom, and holds more streams than it started with
    descriptors for: each gets its stream, none is refused by the kernel."""
    port = free_port()
    log = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    streams = 150
    async with (
        serving_under_limit(port, log, hard=4096) as server,
        ClientSession(connector=TCPConnector(limit=0)) as http,
    ):
        await wait_healthy(http, base, server, log)
        assert open_files_limits_of(server.pid) == (200 + 1024, 4096)
        async with contextlib.AsyncExitStack() as opened:
            for _ in range(streams):
                url = f"{base}/sse/orchestrator/{new_session_id()}"
                async with asyncio.timeout(EVENT_TIMEOUT):  # not accepted: fail, not hang
                    sse = await opened.enter_async_context(open_aiohttp_sse(http, url))
                    first = await sse.next_message()
                assert first is not None and first.retry is not None
            async with http.get(base + "/metrics") as response:
                assert f'orchestrator_connections{{transport="sse"}} {streams}.0' in (
                    await response.text()
                )
    assert "open-file limit" not in log.read_text()


async def test_a_hard_limit_on_open_files_below_max_connections_is_named_in_a_warning(
    tmp_path: Path,
) -> None:
    """Where the hard limit is too low for ``max_connections``, the server raises its soft
    limit as far as it may, serves, and says at start-up what to change."""
    port = free_port()
    log = tmp_path / "server.log"
    async with (
        serving_under_limit(port, log, hard=512) as server,
        ClientSession() as http,
    ):
        await wait_healthy(http, f"http://127.0.0.1:{port}", server, log)
        assert open_files_limits_of(server.pid) == (512, 512)
    warning = [line for line in log.read_text().splitlines() if "open-file limit" in line]
    assert len(warning) == 1, log.read_text()
    assert "is 512" in warning[0] and "max_connections (200)" in warning[0]
    assert "hard limit" in warning[0] and "--max-connections" in warning[0]
