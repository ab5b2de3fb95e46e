"""What every request handler needs, behind one typed app key."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from .config import Settings
from .hub import Hub
from .limits import Admission
from .metrics import Metrics
from .transports.sse_stream import SseStreams


@dataclass(frozen=True, slots=True)
class StreamContext:
    settings: Settings
    hub: Hub
    metrics: Metrics
    admission: Admission
    # The SSE streams aiohttp has let go of (see server.transports.sse_stream).
    sse_streams: SseStreams = field(default_factory=SseStreams)


STREAM_CONTEXT = web.AppKey("stream_context", StreamContext)
