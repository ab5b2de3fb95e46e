"""``python -m bench.with_uvloop MODULE ARGS...``: run a server module on uvloop.

Used by the ``NAME+uvloop`` servers of the suite (``ours+uvloop``,
``naive+uvloop``...), to measure what the event loop itself costs per
delivery. aiohttp's ``run_app`` builds its loop with ``new_event_loop()``,
which follows the policy set here.
"""

from __future__ import annotations

import asyncio
import runpy
import sys


def main() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
