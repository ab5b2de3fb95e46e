"""``python -m server``: flags and environment -> Settings -> serve."""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import gc
import io
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from .agents import register_agents
from .agents.extraction import budget_warning
from .agents.llm import LLMSettings
from .app import create_app
from .config import Settings
from .logs import setup_logging

# After the shutdown grace and the streams' ends (spent in the app's on_shutdown, see
# server.app), how long handlers still running (a refused WebSocket's close, a
# run-workflow waiting with ?wait=true) get before they are cancelled.
HANDLER_SHUTDOWN_TIMEOUT = 3.0


# The cyclic garbage collector stops the event loop while it runs. Nearly all garbage
# here is freed by reference counting; what is left for the collector is little, so it
# may run far less often than CPython's default (gen 0 every 700 allocations).
GC_THRESHOLDS = (50_000, 20, 100)


async def tune_garbage_collection(app: web.Application) -> None:
    """Take what start-up made (modules, pandas and statsmodels, the app) out of the
    collector's view, since it lives as long as the process yet every full collection
    would walk it again, and collect less often. Measured with Redis and 1,000
    sessions: full collections of 80 to 115 ms, p99 latency 43 ms; with this, none
    during the run and 4.4 ms (docs/BENCHMARKS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Descriptors beyond the streams: REST requests, Redis connections, the fit workers' pipes.
FILE_HEADROOM = 1024


def raise_open_files_limit(max_connections: int) -> None:
    """Every stream holds a socket. Raise this process's soft limit on open files to
    ``max_connections`` plus headroom, up to the hard limit (which an unprivileged
    process may do), and warn when even that is too low. With the soft limit most
    shells start with (1,024), the kernel would otherwise refuse connections long
    before ``max_connections`` and its clean 503 / 1013 are reached."""
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise
        return
    wanted = max_connections + FILE_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    except (ValueError, OSError):  # refused (a sandbox): keep what we have
        raised = soft
    if raised < wanted:
        logging.getLogger("server").warning(
            "the open-file limit is %d: below max_connections (%d) plus %d for requests "
            "and Redis; raise the hard limit (systemd LimitNOFILE=, docker --ulimit "
            "nofile=, ulimit -Hn) or lower --max-connections",
            raised,
            max_connections,
            FILE_HEADROOM,
        )


def stop_on_the_first_signal(shutdown_grace: float) -> Callable[[web.Application], Awaitable[None]]:
    """SIGTERM or SIGINT starts the graceful shutdown, as aiohttp's own handlers do; a
    second one while it runs (a double Ctrl+C, a supervisor that signals twice) is
    logged and changes nothing. aiohttp's handlers would raise again in the middle of the
    shutdown: its grace period cut short, requests still waiting (``?wait=true``) dropped,
    exit code 1. SIGKILL still stops the process at once."""

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()

        def first(signum: int) -> None:
            for other in STOP_SIGNALS:
                loop.add_signal_handler(other, again, other)
            raise web.GracefulExit()  # out of the loop's run: aiohttp then shuts down

        def again(signum: int) -> None:
            logging.getLogger("server").warning(
                "%s: shutdown is already under way (running workflows get %.0f s); "
                "SIGKILL stops the process at once",
                signal.Signals(signum).name,
                shutdown_grace,
            )

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, first, signum)

    return install


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# Past the grace period and the handlers' time-out, how much longer a shutdown may take
# (the streams' last bytes and close handshakes, the fit workers) before it counts as stuck.
SHUTDOWN_SLACK = 3.0


def report_a_stuck_shutdown(shutdown_grace: float) -> Callable[[web.Application], Awaitable[None]]:
    """At shutdown, arm a watchdog: if the process is still there once the grace period,
    the handlers' time-out and ``SHUTDOWN_SLACK`` have passed, it says where it is stuck
    (the process is not stopped): every thread's stack goes to stderr, and, if the event
    loop still runs, the stack of every task still pending is logged."""

    async def arm(app: web.Application) -> None:
        stuck_after = shutdown_grace + HANDLER_SHUTDOWN_TIMEOUT + SHUTDOWN_SLACK
        faulthandler.dump_traceback_later(stuck_after, exit=False)
        asyncio.get_running_loop().call_later(stuck_after, _log_pending_tasks)

    return arm


def _log_pending_tasks() -> None:
    log = logging.getLogger("server")
    pending = [task for task in asyncio.all_tasks() if not task.done()]
    log.warning("shutdown is taking too long; %d tasks pending", len(pending))
    for task in pending:
        stack = io.StringIO()
        task.print_stack(file=stack)
        log.warning("pending: %s", stack.getvalue())


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    try:
        llm = LLMSettings.from_env()  # a bad value stops us here, named
    except ValueError as bad:
        print(f"python -m server: error: {bad}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("server")
    if llm.enabled:
        log.info("strategies are read by %s", llm.describe())
    else:
        log.info("strategies are read by the rules: %s", llm.unavailable_reason or "not configured")
    if (warning := budget_warning(llm, settings.agent_timeout)) is not None:
        log.warning(warning)
    raise_open_files_limit(settings.max_connections)
    # The model's settings as read and checked above, not read again at start-up.
    app = create_app(settings, agents=functools.partial(register_agents, llm=llm))
    # First, before the app's own shutdown (the grace period) starts.
    app.on_shutdown.insert(0, report_a_stuck_shutdown(settings.shutdown_grace))
    # First, as aiohttp's own handlers would be: a signal during start-up stops it too.
    app.on_startup.insert(0, stop_on_the_first_signal(settings.shutdown_grace))
    app.on_startup.append(tune_garbage_collection)  # after the app's own start-up
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        # Cancel a handler as soon as its client disconnects: a stream still being set
        # up (its replay read from Redis, say) stops rather than finishing for nobody.
        # (A stream past its handshake is no longer aiohttp's: its own protocol sees
        # the disconnect, see server.transports.stream.)
        handler_cancellation=True,
        handle_signals=False,  # ours: stop_on_the_first_signal
        shutdown_timeout=HANDLER_SHUTDOWN_TIMEOUT,
        # A reconnect storm (a deploy, a network blip) brings every client back at once;
        # aiohttp's default listen queue of 128 drops the SYNs beyond it, and each
        # dropped client waits a second before its retry (measured in bench/, storm).
        backlog=1024,
        access_log=None,
        print=lambda _: logging.getLogger("server").info(
            "serving on http://%s:%s (broker: %s)", settings.host, settings.port, settings.broker
        ),
    )


if __name__ == "__main__":
    main()
