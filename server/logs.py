"""Logging: text (the default) or one JSON object per line, with the session id and
reference id of what is being handled when known.

Request handlers and workflow tasks set :data:`SESSION_ID` (a context variable,
so each asyncio task has its own); a log call may also pass
``extra={"session_id": ..., "reference": ...}``, which wins. Every record then
carries both attributes (``None`` when unknown), so any formatter may use them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError

SESSION_ID: ContextVar[str | None] = ContextVar("session_id", default=None)

_CONTEXT_FIELDS = ("session_id", "reference")


class ContextFilter(logging.Filter):
    """Give every record ``session_id`` (from :data:`SESSION_ID`) and ``reference``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = SESSION_ID.get()
        if not hasattr(record, "reference"):
            record.reference = None
        return True


# Where aiohttp's message starts quoting the request's own bytes (`reading: b'...'`,
# `line '...'`); an apostrophe inside a word ("can't") is not a quote.
_QUOTED_BYTES = re.compile(r""":?\s+b?['"]|\bb['"]""")


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs every malformed HTTP request at ERROR with a traceback. That is the
    client's mistake, and on the open internet a way to flood the log: keep one INFO line.
    The line says what was wrong, not the bytes aiohttp quotes (an over-long line may be an
    ``Authorization`` header: its token stays out of the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= (error.code or 500) < 500:
            lines = error.message.splitlines()
            what = _QUOTED_BYTES.split(lines[0], maxsplit=1)[0] if lines else ""
            record.msg = f"{record.getMessage()}: {error.code} {what}"
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


class ClientProtocolsFilter(logging.Filter):
    """aiohttp warns, twice per handshake, when a client offers WebSocket subprotocols and
    the server knows none (it knows none). That is the client's choice, and any client
    could flood the log with it: it is kept at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "Client protocols" in record.msg:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, session_id, reference,
    and the traceback as ``exception`` (the log is the one place exception text goes)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a header or path that is not valid UTF-8 cannot break the log stream.
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, kind in (
        ("aiohttp.server", MalformedRequestFilter),
        ("aiohttp.websocket", ClientProtocolsFilter),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    # The OpenAI SDK's HTTP client (httpx, httpx2 in openai 3) logs each request's whole
    # URL at INFO: OPENAI_BASE_URL's user info (a password) and query included. The
    # model's host is logged once at start instead; the SDK's own debug lines remain.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
