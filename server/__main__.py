"""``python -m server``: flags and environment -> Settings -> serve."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from .app import create_app
from .config import Settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        # Cancel a streaming handler as soon as its client disconnects, so an idle
        # SSE subscriber is released at once rather than at its next write.
        handler_cancellation=True,
        shutdown_timeout=5.0,
        access_log=None,
        print=lambda _: logging.getLogger("server").info(
            "serving on http://%s:%s (broker: memory)", settings.host, settings.port
        ),
    )


if __name__ == "__main__":
    main()
