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
- ``--gc-log``: changes nothing, but writes one line to stderr (the server's log
  in ``bench/results/logs/``) for every full collection: how long it stopped the
  loop, what it found, and how many objects the collector tracks.
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
    parser.add_argument("--gc-log", action="store_true")
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
    if args.gc_log:
        _log_full_collections()
    sys.argv = [args.module, *rest]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


def _log_full_collections() -> None:
    import time

    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - started[0]) * 1000
        tracked = len(gc.get_objects())
        print(
            f"gc gen2: {pause_ms:.1f} ms, collected {info['collected']}, "
            f"uncollectable {info['uncollectable']}, tracked {tracked}",
            file=sys.stderr,
            flush=True,
        )

    gc.callbacks.append(callback)


if __name__ == "__main__":
    main()
