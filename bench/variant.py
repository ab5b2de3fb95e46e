"""``python -m bench.variant [--uvloop] [--backlog N] [--gc-freeze] MODULE ARGS...``

Runs a server module with one run-time change applied from outside its code,
to measure that one change before anyone edits the server. The suite builds
these from name suffixes: ``ours@HEAD+uvloop``, ``ours@HEAD+backlog``,
``naive+gcfreeze``... (see :func:`bench.servers.resolve`).

- ``--uvloop``: the uvloop event loop (aiohttp's ``run_app`` builds its loop
  with ``new_event_loop()``, which follows the policy set here).
- ``--backlog N``: ``web.run_app(backlog=N)`` instead of aiohttp's 128, the
  listen queue that a reconnect storm overflows.
- ``--gc-freeze``: just before serving, ``gc.collect(); gc.freeze()`` (start-up
  objects leave the collector's view) and ``gc.set_threshold(50_000, 20, 100)``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import runpy
import sys
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.variant")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--backlog", type=int, default=None)
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("module")
    args, rest = parser.parse_known_args()
    # ``python -m`` puts the working directory first: keep it so (ours@REV copies).
    sys.path.insert(0, os.getcwd())
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.backlog is not None or args.gc_freeze:
        from aiohttp import web

        original = web.run_app

        def run_app(*a: Any, **k: Any) -> None:
            if args.gc_freeze:
                gc.collect()
                gc.freeze()
                gc.set_threshold(50_000, 20, 100)
            if args.backlog is not None:
                k["backlog"] = args.backlog
            original(*a, **k)

        web.run_app = functools.wraps(original)(run_app)
    sys.argv = [args.module, *rest]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
