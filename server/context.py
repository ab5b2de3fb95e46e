"""What every request handler needs, behind one typed app key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .config import Settings
from .hub import Hub
from .limits import Admission
from .metrics import Metrics
from .transports.stream import Streams


@dataclass(frozen=True, slots=True)
class StreamContext:
    settings: Settings
    hub: Hub
    metrics: Metrics
    admission: Admission
    # The streams aiohttp has let go of (see server.transports.stream).
    streams: Streams


STREAM_CONTEXT = web.AppKey("stream_context", StreamContext)
