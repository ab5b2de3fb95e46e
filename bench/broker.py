"""The Redis broker alone: its CPU per append, at a fixed rate, revision beside revision.

``python -m bench.broker --servers ours,ours@bbad1ea --repeat 3`` runs, for each
server in turn and ``--repeat`` times over, one process pinned to the server's core
that starts a ``RedisBroker`` on the Redis at 127.0.0.1:6379, watches ``--sessions``
sessions and appends ``--events`` events to them, one every ``1/--rate`` s, each
awaited as a publish request awaits it. It prints the process's CPU time per append
(user and system): the append, its live delivery back to this process, and the timer
that paces the loop (the same for every revision). The pacing is not measured alone
and taken off: a process that only sleeps and wakes costs a different amount per
wake-up than a busy one (measured, the difference swung from run to run), so only
the comparison between revisions means something.

The full suite (``python -m bench``) measures the broker under an HTTP server and a
load generator, whose own cost and noise hide a change of 10 to 20 µs per event on a
shared machine; this measures what changed in the broker, and only that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .servers import DEFAULT_REDIS_URL, ROOT, SERVER_CPU, pinned, resolve

_BODY = json.dumps({"type": "progress", "message": "x" * 150})


async def _measure(url: str, sessions: int, events: int, rate: float) -> dict[str, float]:
    """In the child process: the CPU per append, with ``server`` as the revision's."""
    from server.brokers.redis import RedisBroker  # the revision's, by sys.path

    delivered: list[Any] = []
    broker = RedisBroker(url, 100, 60.0, key_prefix=f"bench-broker-{secrets.token_hex(4)}")
    await broker.start(delivered.append)
    ids = [f"s{n}" for n in range(sessions)]
    try:
        for session_id in ids:
            await broker.watch(session_id)
        for n in range(200):  # warm up: scripts loaded, connections open
            await broker.append(ids[n % sessions], "progress", _BODY, False)

        async def append(n: int) -> None:
            await broker.append(ids[n % sessions], "progress", _BODY, False)

        user, system = await _paced(events, rate, append)
        if len(delivered) < 200 + events:
            raise RuntimeError(f"{200 + events - len(delivered)} appends were not delivered")
    finally:
        await broker.close()
    return {"cpu_us": user + system, "user_us": user, "system_us": system}


async def _paced(
    events: int, rate: float, step: Callable[[int], Awaitable[None]]
) -> tuple[float, float]:
    """Run ``step`` ``events`` times at ``rate`` per second; the CPU µs (user, system) per
    step, pacing included."""
    loop = asyncio.get_running_loop()
    before = resource.getrusage(resource.RUSAGE_SELF)
    due = loop.time()
    for n in range(events):
        due += 1 / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        await step(n)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (
        (after.ru_utime - before.ru_utime) / events * 1e6,
        (after.ru_stime - before.ru_stime) / events * 1e6,
    )


def _run_child(server: str, args: argparse.Namespace) -> dict[str, float]:
    spec = resolve(server)
    if spec.broker is None:
        raise SystemExit(f"{server}: only ours and ours@REV have a broker")
    # The revision's folder first (as the working directory), so ``server`` is its;
    # bench/ from the checkout.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench.broker", "--child", *_options(args)]
    result = subprocess.run(
        command,
        cwd=spec.cwd,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=pinned(SERVER_CPU),
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{server} failed:\n{result.stderr}")
    measured: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def _options(args: argparse.Namespace) -> list[str]:
    return [
        *("--url", args.url),
        *("--sessions", str(args.sessions)),
        *("--events", str(args.events)),
        *("--rate", str(args.rate)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="ours", help="ours and ours@REV, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server; medians shown")
    parser.add_argument("--url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--sessions", type=int, default=200, help="sessions watched")
    parser.add_argument("--events", type=int, default=3000, help="appends measured")
    parser.add_argument("--rate", type=float, default=1000.0, help="appends per second")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_measure(args.url, args.sessions, args.events, args.rate))))
        return
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    runs: dict[str, list[dict[str, float]]] = {server: [] for server in servers}
    for _ in range(args.repeat):
        for server in servers:  # interleaved, so a slow spell of the machine hits all
            run = _run_child(server, args)
            runs[server].append(run)
            print(f"[broker] {server:24} {run['cpu_us']:7.1f} µs per append", flush=True)
    print("\n| server | CPU µs per append (median) | user | system | runs |")
    print("|---|--:|--:|--:|---|")
    for server, measured in runs.items():
        cpu = [m["cpu_us"] for m in measured]
        user = statistics.median(m["user_us"] for m in measured)
        system = statistics.median(m["system_us"] for m in measured)
        spread = ", ".join(f"{c:.1f}" for c in cpu)
        print(f"| {server} | {statistics.median(cpu):.1f} | {user:.1f} | {system:.1f} | {spread} |")


if __name__ == "__main__":
    main()
