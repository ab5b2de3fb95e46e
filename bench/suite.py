"""``python -m bench``: every scenario against every server, a table, and a JSON file.

For each (scenario, server) pair a fresh server process is started, pinned
to core 0, and a fresh load generator process (:mod:`bench.loadgen`),
pinned to core 1, runs the scenario and reports. Both are always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import profile, report
from .servers import (
    DEFAULT_REDIS_URL,
    DEFAULT_SERVERS,
    LOADGEN_CPU,
    NICE,
    ROOT,
    SERVERS,
    pin_revision,
    pinned,
    resolve,
    running,
    source_revision,
    use_redis,
)

JSON = dict[str, Any]
RESULTS = ROOT / "bench" / "results"

_THROUGHPUT = {
    "kind": "throughput",
    "connect_concurrency": 100,
    "connect_timeout": 120.0,
    "publish_connections": 8,
    "warmup_timeout": 5.0,
    "drain_timeout": 10.0,
}
# The full scales of issue 7.
SCENARIOS: dict[str, JSON] = {
    "fanout": {
        **_THROUGHPUT,
        "transport": "ws",
        "sessions": 1,
        "subscribers_per_session": 1000,
        "rate": 20,  # events/s: x 1,000 subscribers = 20,000 deliveries/s
        "fixed_s": 10.0,
        "sat_s": 8.0,
        "window_events": 20,
    },
    "sessions": {
        **_THROUGHPUT,
        "transport": "ws",
        "sessions": 1000,
        "subscribers_per_session": 1,
        "rate": 1000,  # events/s over all sessions = 1,000 deliveries/s
        "fixed_s": 10.0,
        "sat_s": 8.0,
        "window_events": 256,
    },
    "idle_ws": {
        "kind": "idle",
        "transport": "ws",
        "connections": 10_000,
        "connect_concurrency": 200,
        "connect_timeout": 300.0,
        "hold_s": 2.0,
        "warm_pause_s": 1.0,
        "probe_sessions": 100,
    },
    "storm": {
        "kind": "storm",
        "transport": "ws",
        "clients": 1000,
        "sessions": 1,
        "warm_events": 5,
        "behind": 50,
        "connect_concurrency": 100,
        "connect_timeout": 120.0,
        "storm_timeout": 10.0,
    },
}
SCENARIOS["fanout_sse"] = {**SCENARIOS["fanout"], "transport": "sse"}
SCENARIOS["sessions_sse"] = {**SCENARIOS["sessions"], "transport": "sse"}
SCENARIOS["idle_sse"] = {**SCENARIOS["idle_ws"], "transport": "sse"}
# Many sessions, each with a workflow running in another process (bench/lease_holder.py).
SCENARIOS["sessions_held"] = {**SCENARIOS["sessions"], "held_leases": True}
SCENARIOS["storm_sse"] = {**SCENARIOS["storm"], "transport": "sse"}
ORDER = (
    "fanout",
    "fanout_sse",
    "sessions",
    "sessions_sse",
    "sessions_held",
    "idle_ws",
    "idle_sse",
    "storm",
    "storm_sse",
)

# ``--quick``: the same scenarios at smoke-test scale.
_QUICK_PHASES = {"fixed_s": 0.6, "sat_s": 0.6, "warmup_timeout": 1.0, "drain_timeout": 3.0}
QUICK: dict[str, JSON] = {
    "fanout": {"subscribers_per_session": 50, **_QUICK_PHASES},
    "sessions": {"sessions": 50, "rate": 100, **_QUICK_PHASES},
    "idle_ws": {"connections": 300, "hold_s": 0.2, "warm_pause_s": 0.3, "probe_sessions": 20},
    "storm": {"clients": 50, "behind": 20, "storm_timeout": 1.5},
}
QUICK["fanout_sse"] = QUICK["fanout"]
QUICK["sessions_sse"] = QUICK["sessions_held"] = QUICK["sessions"]
QUICK["idle_sse"] = QUICK["idle_ws"]
QUICK["storm_sse"] = QUICK["storm"]


def scenario_config(name: str, quick: bool) -> JSON:
    cfg = {**SCENARIOS[name], **(QUICK[name] if quick else {})}
    if cfg["kind"] == "throughput":
        cfg["scenario_timeout"] = (
            cfg["connect_timeout"]
            + cfg["warmup_timeout"]
            + 3 * cfg["fixed_s"]
            + cfg["sat_s"]
            + 2 * cfg["drain_timeout"]
            + 30
        )
    elif cfg["kind"] == "idle":
        cfg["scenario_timeout"] = cfg["connect_timeout"] + 120
    else:
        cfg["scenario_timeout"] = cfg["connect_timeout"] + cfg["storm_timeout"] + 90
    return cfg


def run_one(
    scenario: str,
    server: str,
    quick: bool,
    log_dir: Path,
    profile_dir: Path | None = None,
    ws_client: str = "raw",
) -> JSON:
    """One scenario against one fresh server; never raises for a failed run.

    With ``profile_dir``, py-spy records the server for the whole scenario.
    """
    cfg = scenario_config(scenario, quick)
    row: JSON = {
        "scenario": scenario,
        "server": server,
        "transport": cfg["transport"],
        "load_before": round(os.getloadavg()[0], 2),  # others' work on the machine
    }
    try:
        spec = resolve(server)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return {**row, "error": f"cannot resolve {server}: {exc}"}
    row["server_note"] = spec.note
    if cfg["transport"] not in spec.transports:
        return {**row, "skipped": f"{server} has no {cfg['transport'].upper()}"}
    if spec.scenarios is not None and scenario not in spec.scenarios:
        return {**row, "skipped": "not part of this server's rows"}
    if cfg.get("held_leases"):
        if spec.broker is None:
            return {**row, "skipped": "a peer runs no workflows"}
        # No other process can hold a lease in the memory broker: its row is the same
        # load without them, the baseline of the Redis row.
        if spec.broker == "redis":
            cfg["lease_holder_redis"] = spec.env["ORCHESTRATOR_REDIS_URL"]
    reason = spec.unavailable()
    if reason:
        return {**row, "skipped": reason}
    try:
        with running(spec, log_dir / f"{server.replace('@', '-at-').replace('+', '-')}.log") as (
            process,
            port,
        ):
            cfg = {**cfg, "port": port, "server_pid": process.pid, "ws_client": ws_client}
            raw = (
                profile_dir / f"{scenario}-{server.replace('@', '-at-')}.txt"
                if profile_dir
                else None
            )
            recorder = profile.start(process.pid, raw) if raw else None
            loadgen = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=pinned(LOADGEN_CPU),
            )
            try:
                out, err = loadgen.communicate(
                    json.dumps(cfg).encode(), timeout=cfg["scenario_timeout"] + 60
                )
            finally:
                if loadgen.poll() is None:
                    loadgen.kill()
                    loadgen.wait(10)
                if recorder is not None and raw is not None:
                    summary = profile.stop(recorder, raw)
                    if summary:
                        row["profile"] = str(raw)
                        print(summary, file=sys.stderr)
            if loadgen.returncode != 0 or not out:
                tail = err.decode(errors="replace").strip().splitlines()[-3:]
                return {**row, "error": f"load generator failed: {' | '.join(tail)}"}
            result = json.loads(out)
            alive = process.poll() is None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    return {**row, **result, "config": cfg, "server_survived": alive}


def machine() -> JSON:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("aiohttp", "aiohttp-sse", "pydantic", "fastapi", "uvicorn", "websockets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": versions,
    }


# What a run says about correctness: added up over rounds, never a median, so a loss in
# one round of three shows in the row (a median would make it 0).
_INTEGRITY_COUNTS = frozenset({"lost", "duplicated", "reordered", "starved", "publish_failed"})


def aggregate(runs: list[JSON]) -> JSON:
    """Measurements are medians over repeats, field by field; what says whether the run
    was sound is never a median: integrity counts (lost, duplicated, reordered, starved,
    failed publishes) and control events are added up over the rounds, and a flag
    (drained, server survived) holds only if it held in every round. Each round's own
    result is kept under ``rounds``.

    A run that failed is left out of the medians, and the row names its error
    (``failed_runs``): a median of fewer runs than asked for must say so.
    """
    if len(runs) == 1:
        return runs[0]

    def total(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            keys = dict.fromkeys(k for v in values for k in v)
            return {k: sum(v.get(k, 0) for v in values) for k in keys}
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        return sum(numbers) if numbers else values[0]

    def merge(values: list[Any], key: str = "") -> Any:
        if key in _INTEGRITY_COUNTS or key == "controls":
            return total(values)
        if all(isinstance(v, dict) for v in values):
            keys = dict.fromkeys(k for v in values for k in v)  # every round's, in order
            return {k: merge([v.get(k) for v in values], k) for k in keys}
        if all(isinstance(v, bool) for v in values):
            return all(values)
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(values):
            median = statistics.median(numbers)
            # Counts stay counts where an even number of runs agrees (0 lost, not 0.0).
            if all(isinstance(v, int) for v in numbers) and median == int(median):
                return int(median)
            return round(median, 6)
        return values[0]

    completed = [run for run in runs if "error" not in run]
    if not completed:
        return {**runs[0], "repeats": 0}  # every run failed: the row is the first failure
    merged: JSON = merge(completed) if len(completed) > 1 else dict(completed[0])
    merged["repeats"] = len(completed)
    merged["rounds"] = runs
    failed = [run["error"] for run in runs if "error" in run]
    if failed:
        merged["failed_runs"] = failed
    return merged


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark our server against the naive aiohttp peer and the seed design.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test scales (< 1 min)")
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"comma-separated scenarios, or 'all': {', '.join(ORDER)}",
    )
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated servers: {', '.join(SERVERS)}; ours@REV runs server/ "
        "as of a git revision; suffixes +uvloop, +backlog, +gcfreeze apply one run-time change",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds, each running every server once; medians"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the server and load generator (negative needs root): "
        "less preemption by other work on a shared machine",
    )
    parser.add_argument(
        "--ws-client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="WebSocket subscriber: raw frames on a raw socket (cheap), or aiohttp's client",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="the Redis of the ours-redis rows (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record each server with py-spy (bench/results/profiles/) and print top frames",
    )
    args = parser.parse_args(argv)
    args.scenarios = list(ORDER) if args.scenario == "all" else args.scenario.split(",")
    try:
        args.server_names = [pin_revision(name) for name in args.servers.split(",")]
    except (OSError, subprocess.SubprocessError) as exc:
        parser.error(f"unknown git revision in --servers: {exc}")
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(ORDER)}")
    for name in args.server_names:
        if name.partition("+")[0].partition("@")[0] not in SERVERS:
            parser.error(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
    if not 1 <= args.repeat <= 9:
        parser.error("--repeat is between 1 and 9")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    NICE["value"] = args.nice
    use_redis(args.redis_url)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or RESULTS / f"bench-{stamp}.json"
    log_dir = RESULTS / "logs" / stamp
    started = time.monotonic()
    load_before = os.getloadavg()
    rows: list[JSON] = []
    for scenario in args.scenarios:
        # Round by round, every server once a round: this machine's speed drifts over
        # minutes (a VM's host), and a slow spell must fall on every server's runs alike,
        # not on all the runs of one server.
        runs: dict[str, list[JSON]] = {server: [] for server in args.server_names}
        for round_number in range(1, args.repeat + 1):
            for server in args.server_names:
                done = runs[server]
                if done and ("skipped" in done[-1] or "error" in done[-1]):
                    continue
                run = run_one(
                    scenario,
                    server,
                    args.quick,
                    log_dir,
                    RESULTS / "profiles" / stamp if args.profile else None,
                    args.ws_client,
                )
                done.append(run)
                if args.repeat > 1:
                    # A round of four servers takes minutes: say how each run went as it ends.
                    label = f"round {round_number}/{args.repeat}"
                    print(report.progress_line(run, label), file=sys.stderr, flush=True)
        for server in args.server_names:
            row = aggregate(runs[server])
            rows.append(row)
            label = f"median of {row['repeats']}" if row.get("repeats", 1) > 1 else ""
            print(report.progress_line(row, label), file=sys.stderr, flush=True)
    document = {
        "started": stamp,
        "quick": args.quick,
        "nice": args.nice,
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine(),
        "ours_source": source_revision(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2))
    print(report.markdown(document))
    print(f"\nJSON: {output}")
    return 0
