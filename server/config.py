"""Every knob of the server in one frozen object.

Each field is a command-line flag (``--buffer-size``) and an environment
variable (``ORCHESTRATOR_BUFFER_SIZE``); the flag wins over the variable,
the variable over the default. ``python -m server --help`` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "ORCHESTRATOR_"


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


_DEFAULT_PORTS = ("https://", ":443"), ("http://", ":80")


def normalise_origin(origin: str) -> str:
    """An origin as browsers send it: no trailing slash, scheme and host in lower case,
    no default port (a browser never sends ``https://app.example:443``)."""
    origin = origin.strip().rstrip("/").lower()
    for scheme, port in _DEFAULT_PORTS:
        if origin.startswith(scheme) and origin.endswith(port):
            return origin.removesuffix(port)
    return origin


def origin_named(origin: str, allowed: tuple[str, ...]) -> bool:
    """``origin`` is one of ``allowed`` by name, not let in by a ``*``: it may send the
    user's cookies. :class:`Settings` keeps ``cors_origins`` normalised."""
    return normalise_origin(origin) in allowed


def origin_listed(origin: str, allowed: tuple[str, ...]) -> bool:
    """``origin`` is one of ``allowed`` (``*`` lists all), as CORS and the WebSocket check
    both read it."""
    return "*" in allowed or origin_named(origin, allowed)


# Secrets that, when set, protect something: set but empty they would protect nothing
# (an empty bearer token, tokens signed with an empty key), so they are refused.
_SECRETS = ("publish_token", "stream_token_secret")


@dataclass(frozen=True, slots=True)
class Settings:
    """The server's configuration. Build it with :meth:`from_args` or directly in tests."""

    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on"})
    heartbeat_interval: float = field(
        default=30.0,
        metadata={
            "help": "seconds between heartbeat events on every stream, also the WebSocket "
            "ping/pong interval used to drop dead peers"
        },
    )
    buffer_size: int = field(
        default=1000,
        metadata={"help": "stored events kept per session for replay (a workflow stores about 35)"},
    )
    session_ttl: float = field(
        default=600.0,
        metadata={
            "help": "seconds an ended session stays replayable; also how long a session with "
            "no activity and no final event is kept (one whose workflow runs is kept until "
            "it ends)"
        },
    )
    subscriber_queue_size: int = field(
        default=500,
        metadata={
            "help": "live events one subscriber may fall behind before it is disconnected "
            "as a slow consumer (it then resumes from the buffer)"
        },
    )
    sse_retry_ms: int = field(
        default=2000, metadata={"help": "reconnection delay sent to EventSource clients (retry:)"}
    )
    max_frame_size: int = field(
        default=64 * 1024,
        metadata={"help": "largest WebSocket frame accepted from a client, in bytes (1009 above)"},
    )
    max_body_size: int = field(
        default=256 * 1024, metadata={"help": "largest REST request body, in bytes (413 above)"}
    )
    body_timeout: float = field(
        default=30.0,
        metadata={
            "help": "seconds a REST request body may take to arrive once its headers are in "
            "(408 after, and the connection is closed)"
        },
    )
    max_strategy_length: int = field(
        default=4000, metadata={"help": "longest strategy_description accepted, in characters"}
    )
    agent_timeout: float = field(
        default=60.0, metadata={"help": "seconds an agent may run before it is timed out"}
    )
    cors_origins: tuple[str, ...] = field(
        default=("http://localhost:5173",),
        metadata={"help": "comma-separated origins allowed by CORS (the frontend's)"},
    )
    publish_token: str | None = field(
        default=None,
        metadata={
            "help": "bearer token required by POST /api/sessions/{id}/events; "
            "when unset only loopback clients may publish"
        },
    )
    broker: str = field(
        default="memory",
        metadata={
            "help": "where events are stored: 'memory' (one process) or 'redis' "
            "(any number of processes sharing --redis-url)",
            "choices": ("memory", "redis"),
        },
    )
    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata={"help": "the Redis server of --broker redis"},
    )
    redis_key_prefix: str = field(
        default="orch",
        metadata={
            "help": "prefix of every Redis key and channel of --broker redis (deployments "
            "sharing one Redis need different prefixes; all processes of one must share it)"
        },
    )
    lease_ttl: float = field(
        default=10.0,
        metadata={
            "help": "seconds a running workflow's lease outlives its last renewal (renewed "
            "every third of it): how soon other processes notice that the process running "
            "a workflow died, and end its session with workflow_interrupted"
        },
    )
    lease_check_interval: float = field(
        default=2.0,
        metadata={
            "help": "seconds between two checks, by each process, of the workflow leases of "
            "the sessions it streams"
        },
    )
    max_connections: int = field(
        default=10_000,
        metadata={
            "help": "open WebSocket + SSE streams this process accepts in total "
            "(WebSocket 1013, SSE 503 above)"
        },
    )
    max_connections_per_session: int = field(
        default=50,
        metadata={"help": "open streams of one session (WebSocket 1013, SSE 503 above)"},
    )
    max_sessions: int = field(
        default=2_000,
        metadata={
            "help": "live sessions in this process: those with an open stream or a running "
            "workflow here (a new one gets 1013 or 503 above)"
        },
    )
    stream_token_secret: str | None = field(
        default=None,
        metadata={
            "help": "when set, run-workflow returns a signed token for its session and the "
            "WebSocket, SSE and session endpoints require it (?token=)"
        },
    )
    stream_token_ttl: float = field(
        default=3600.0,
        metadata={
            "help": "seconds a stream token may open streams (one already open is not cut off)"
        },
    )
    shutdown_grace: float = field(
        default=10.0,
        metadata={
            "help": "seconds running workflows get to finish on SIGTERM/SIGINT before they "
            "are interrupted (workflow_interrupted)"
        },
    )
    log_format: str = field(
        default="text",
        metadata={
            "help": "text, or json for one JSON object per line",
            "choices": ("text", "json"),
        },
    )
    log_level: str = field(
        default="INFO",
        metadata={"help": "how much to log", "choices": ("DEBUG", "INFO", "WARNING", "ERROR")},
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if str(f.type) in ("int", "float"):
                _check_number(f.name, getattr(self, f.name))
        for name in _SECRETS:
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(
                    f"{name} is set but empty: give it a secret, or leave it unset "
                    f"({ENV_PREFIX}{name.upper()}, --{name.replace('_', '-')})"
                )
        # Compared with the Origin header as browsers send it, by CORS and the WebSocket check.
        origins = tuple(normalise_origin(origin) for origin in self.cors_origins)
        object.__setattr__(self, "cors_origins", origins)

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Parse flags, falling back to ``ORCHESTRATOR_*`` environment variables."""
        env = os.environ if environ is None else environ
        parser = build_parser(env)
        namespace = parser.parse_args(argv)
        try:
            return cls(**vars(namespace))
        except ValueError as error:
            parser.error(str(error))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# Numbers that may be 0 (the least each may be); every other must be above 0. A zero or
# negative interval, size or limit would not fail at start but serve oddly: a heartbeat
# interval of 0 turns the heartbeat timer into a busy loop, a buffer of 0 replays nothing.
_MAY_BE_ZERO = ("port", "shutdown_grace")
_MAX_PORT = 65535


def _check_number(name: str, value: float) -> None:
    flag = f"--{name.replace('_', '-')}, {ENV_PREFIX}{name.upper()}"
    if not math.isfinite(value) or value < 0 or (value == 0 and name not in _MAY_BE_ZERO):
        least = "0 or more" if name in _MAY_BE_ZERO else "above 0"
        raise ValueError(f"{name} must be a number {least}, not {value!r} ({flag})")
    if name == "port" and value > _MAX_PORT:
        raise ValueError(f"port must be 0 to {_MAX_PORT}, not {value!r} ({flag})")


def _converter(f: dataclasses.Field[Any]) -> Any:
    kind = str(f.type)
    if kind == "int":
        return int
    if kind == "float":
        return float
    if kind.startswith("tuple"):
        return _csv
    return str


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Real-time progress streaming server for the orchestrator "
        "(WebSocket and Server-Sent Events).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Settings):
        convert = _converter(f)
        env_name = ENV_PREFIX + f.name.upper()
        default = f.default
        if env_name in environ:
            try:
                default = convert(environ[env_name])
            except ValueError:
                parser.error(f"{env_name}={environ[env_name]!r} is not a valid {f.type}")
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=convert,
            default=default,
            choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} [env {env_name}] (default: {shown})",
        )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser
