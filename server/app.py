"""create_app(): routes, middlewares, and the lifetime of the hub, broker and agents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from .agents import register_agents
from .agents.handoff import AgentHandoffManager
from .agents.llm import LLMSettings
from .api import SESSION_ID_SEGMENT, WORKFLOW_RUNNER, add_routes
from .brokers import create_broker
from .brokers.base import Broker
from .config import Settings, origin_listed, origin_named
from .context import STREAM_CONTEXT, StreamContext
from .contract import add_contract_routes
from .error_answers import answer_error
from .hub import Hub
from .keep_alives import KeepAlives
from .limits import Admission
from .logs import SESSION_ID
from .messages import is_valid_session_id
from .metrics import Metrics
from .transports.sse import sse_handler
from .transports.stream import Streams
from .transports.websocket import websocket_handler
from .workflow import WorkflowRunner

STATIC_DIR = Path(__file__).parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AgentResources(Protocol):
    async def close(self) -> None: ...


RegisterAgents = Callable[[AgentHandoffManager], AgentResources]


# The middlewares are plain functions that hand back the next handler's awaitable instead
# of awaiting it (the errors middleware does so for the streams): a stream lives for hours
# inside its middlewares, and each ``async`` one would keep a suspended frame (about 300
# bytes) per connection for it.


@web.middleware
def log_context_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """What is logged while handling a request names its session (see :mod:`server.logs`).

    aiohttp runs each request in a task of its own, with its own copy of the context,
    so the value needs no reset: it ends with the request."""
    session_id = request.match_info.get("session_id")
    if session_id is not None and is_valid_session_id(session_id):
        SESSION_ID.set(session_id)
    return handler(request)


@web.middleware
def errors_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Every error becomes ``{"error", "code", "reference"}``; internals go to the log only.

    Catching needs a suspended frame around the handler for as long as it runs, about
    340 bytes: for the hours of a stream, on every connection. So the two stream
    handlers catch their own errors, with the same :func:`answer_error`, in their own
    frame, and only the other routes are awaited here."""
    if request.match_info.handler in _ANSWER_THEIR_OWN_ERRORS:
        return handler(request)
    return _answering_errors(request, handler)


_ANSWER_THEIR_OWN_ERRORS = frozenset({websocket_handler, sse_handler})


def keep_alives_middleware(keep_alives: KeepAlives) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Lets shutdown find aiohttp's connections (server/keep_alives.py)."""

    @web.middleware
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        keep_alives.seen(request)
        return handler(request)

    return middleware


async def _answering_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return answer_error(request, exc)


def cors_middleware(allowed: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Answer CORS preflights from the allowed origins (the headers themselves are added
    in ``on_response_prepare``, so streaming responses get them too)."""

    @web.middleware
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin and origin_listed(origin, allowed):
            return _preflight()
        return handler(request)

    return middleware


async def _preflight() -> web.StreamResponse:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type, Authorization, Last-Event-ID",
            "Access-Control-Max-Age": "600",
        },
    )


def _on_response_prepare(allowed: tuple[str, ...]) -> Callable[..., Awaitable[None]]:
    """One hook for every response, streams included (it runs once per published event)."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        # aiohttp's default "Server: Python/3.x aiohttp/3.x" tells an attacker what to look up.
        response.headers.popall("Server", None)
        if not allowed:
            return
        origin = request.headers.get("Origin")
        if origin and origin_listed(origin, allowed):
            response.headers["Access-Control-Allow-Origin"] = origin
            if origin_named(origin, allowed):  # not let in by a '*'
                response.headers["Access-Control-Allow-Credentials"] = "true"
            # A 503's Retry-After says when to come back; unlisted, a page cannot read it.
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers["Vary"] = "Origin"

    return on_prepare


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def _register_default_agents(handoff: AgentHandoffManager) -> AgentResources:
    return register_agents(handoff, LLMSettings.from_env())


def create_app(
    settings: Settings,
    *,
    broker: Broker | None = None,
    agents: RegisterAgents = _register_default_agents,
) -> web.Application:
    """Build the app. ``broker`` defaults to the one ``settings.broker`` names;
    ``agents`` registers the agents at startup and returns what to close at cleanup
    (tests pass fakes)."""
    metrics = Metrics()
    if broker is None:
        broker = create_broker(settings)
    hub = Hub(
        broker,
        queue_size=settings.subscriber_queue_size,
        metrics=metrics,
        heartbeat_interval=settings.heartbeat_interval,
        buffer_size=settings.buffer_size,
    )
    handoff = AgentHandoffManager(
        hub.publish,
        default_timeout=settings.agent_timeout,
        on_finished=lambda run: metrics.agent_finished(run.agent, run.outcome, run.duration_s),
    )
    runner = WorkflowRunner(
        hub,
        handoff,
        metrics,
        lease_ttl=settings.lease_ttl,
        lease_check_interval=settings.lease_check_interval,
        retry_finals_for=settings.session_ttl,
    )
    admission = Admission(settings, metrics)
    metrics.track_sessions(
        subscribed=lambda: hub.session_count,
        running=lambda: runner.running,
        live=lambda: admission.sessions,
    )

    keep_alives = KeepAlives()
    app = web.Application(
        client_max_size=settings.max_body_size,
        middlewares=[keep_alives_middleware(keep_alives), log_context_middleware, errors_middleware]
        # Without allowed origins there is no preflight to answer: no layer for it.
        + ([cors_middleware(settings.cors_origins)] if settings.cors_origins else []),
    )
    streams = Streams()
    app[STREAM_CONTEXT] = StreamContext(settings, hub, metrics, admission, streams)
    app[WORKFLOW_RUNNER] = runner

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await hub.start()
        streams.start(settings.heartbeat_interval)  # pings the WebSockets' peers
        await runner.monitor.start()  # ends sessions whose workflow's process died
        resources = agents(handoff)
        try:
            yield
        finally:
            await runner.close()
            await streams.close()
            await hub.close()
            await resources.close()

    async def on_shutdown(app: web.Application) -> None:
        # aiohttp has stopped accepting connections and awaits this before it waits on the
        # handlers. Running workflows get the grace period, then end with a final
        # workflow_interrupted error, so their subscribers get a last event; every other
        # stream then ends (WebSocket 1001, SSE end of response) so clients resume elsewhere.
        # First, the REST connections idle between two requests: see server/keep_alives.py.
        keep_alives.close_idle()
        await runner.close(settings.shutdown_grace)
        hub.close_all("shutdown")
        # The streams are no longer aiohttp's: it would not wait for them.
        await streams.ended()

    app.cleanup_ctx.append(lifetime)
    app.on_shutdown.append(on_shutdown)
    app.on_response_prepare.append(_on_response_prepare(settings.cors_origins))

    # GET only: a HEAD would take a connection's place and read a replay, then be refused.
    app.router.add_get(
        f"/ws/orchestrator/{SESSION_ID_SEGMENT}", websocket_handler, allow_head=False
    )
    app.router.add_get(f"/sse/orchestrator/{SESSION_ID_SEGMENT}", sse_handler, allow_head=False)
    add_routes(app)
    add_contract_routes(app)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    return app
