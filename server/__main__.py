"""``python -m server``: flags and environment -> Settings -> serve."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web

from .app import create_app
from .config import Settings
from .logs import setup_logging

# After the shutdown grace (spent in the app's on_shutdown, see server.app), how long
# handlers get to send their last frames (1001, end of stream) before they are cancelled.
HANDLER_SHUTDOWN_TIMEOUT = 3.0


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    setup_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        # Cancel a streaming handler as soon as its client disconnects, so an idle
        # SSE subscriber is released at once rather than at its next write.
        handler_cancellation=True,
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
