"""Where an idle connection's memory goes: tracemalloc in the server around N idle connections.

``python -m bench.memory --server ours --transport ws --connections 2000``
starts the server under tracemalloc, warms it up, snapshots, opens N idle
subscribers (one session each, as in the ``idle_*`` scenarios), snapshots
again, and prints the allocation sites that grew, per connection, beside the
RSS growth. tracemalloc sees Python allocations only (not, say, a C
parser's own buffers), so its total is a lower bound on the RSS growth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import psutil

from .clients import Recorder, Tally
from .loadgen import Subscribers, raise_open_files_limit, session_ids
from .servers import LOADGEN_CPU, ROOT, resolve, running

# Runs the server module under tracemalloc; SIGUSR1 dumps a snapshot to argv[1].N.
_SHIM = """
import runpy, signal, sys, tracemalloc
tracemalloc.start(int(sys.argv[2]))
prefix, count = sys.argv[1], [0]
def dump(signum, frame):
    count[0] += 1
    tracemalloc.take_snapshot().dump(f"{prefix}.{count[0]}.tmp")
    import os; os.rename(f"{prefix}.{count[0]}.tmp", f"{prefix}.{count[0]}")
signal.signal(signal.SIGUSR1, dump)
module = sys.argv[3]
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


async def _snapshot(pid: int, prefix: Path, index: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = Path(f"{prefix}.{index}")
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the server wrote no snapshot")
        await asyncio.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))


async def measure(port: int, pid: int, prefix: Path, args: argparse.Namespace) -> str:
    server = psutil.Process(pid)
    recorder = Recorder(3)
    warm_ids = session_ids(200, prefix="w")
    async with Subscribers(port, args.transport, warm_ids) as warm:
        await warm.open_many([Tally(recorder, s) for s in range(200)], concurrency=50, timeout=60.0)
    await asyncio.sleep(1.0)
    before = await _snapshot(pid, prefix, 1)
    rss0 = server.memory_info().rss
    ids = session_ids(args.connections)
    async with Subscribers(port, args.transport, ids) as subs:
        opened = await subs.open_many(
            [Tally(recorder, s) for s in range(args.connections)],
            concurrency=200,
            timeout=300.0,
        )
        await asyncio.sleep(2.0)
        rss1 = server.memory_info().rss
        after = await _snapshot(pid, prefix, 2)
    stats = after.compare_to(before, "lineno")
    traced = sum(s.size_diff for s in stats)
    lines = [
        f"{args.server} {args.transport}: {opened} idle connections",
        f"RSS growth {(rss1 - rss0) / opened / 1024:.2f} KiB per connection; "
        f"tracemalloc growth {traced / opened / 1024:.2f} KiB per connection (Python objects)",
        "",
        "top allocation sites by growth (bytes per connection, objects per connection):",
    ]
    for stat in stats[: args.top]:
        if stat.size_diff <= 0:
            continue
        frame = stat.traceback[0]
        where = frame.filename.replace(str(ROOT) + "/", "")
        where = where.split("site-packages/")[-1]
        lines.append(
            f"  {stat.size_diff / opened:8.1f} B  {stat.count_diff / opened:5.2f}  "
            f"{where}:{frame.lineno}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--server", default="ours", help="ours, naive, seed or ours@REV")
    parser.add_argument("--transport", choices=("ws", "sse"), default="ws")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=8, help="traceback depth kept")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 10_000:
        parser.error("--connections is between 1 and 10,000")
    raise_open_files_limit()
    if LOADGEN_CPU < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {LOADGEN_CPU})
    spec = resolve(args.server)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = ROOT / "bench" / "results" / "memory"
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"{stamp}-{args.server.replace('@', '-at-')}-{args.transport}"

    def command(port: int) -> list[str]:
        base = spec.command(port)
        assert base[1] == "-m", base
        return [sys.executable, "-c", _SHIM, str(prefix), str(args.frames), *base[2:]]

    traced = replace(spec, command=command)
    with running(traced, out_dir / f"{stamp}.log") as (process, port):
        report = asyncio.run(measure(port, process.pid, prefix, args))
    Path(f"{prefix}.txt").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
