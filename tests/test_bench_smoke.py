"""The benchmark suite runs end to end at smoke scale (functional only: no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` from the checkout, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def test_quick_fanout_against_ours_delivers_everything_once(tmp_path: Path) -> None:
    """`python -m bench --quick --scenario fanout --servers ours` reports no loss or duplicate."""
    output = tmp_path / "bench.json"
    completed = run_bench(
        "bench", "--quick", "--scenario", "fanout", "--servers", "ours", "--output", str(output)
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| fanout | ours |" in completed.stdout

    (row,) = json.loads(output.read_text())["rows"]
    assert "error" not in row and "skipped" not in row, row
    assert row["opened"] == row["subscribers"]
    assert row["receivers"] == row["subscribers"]
    assert row["lost"] == 0
    assert row["duplicated"] == 0
    assert row["reordered"] == 0
    assert row["starved"] == 0
    assert row["publish_failed"] == 0
    assert row["fixed"]["deliveries"] == row["fixed"]["expected_deliveries"] > 0
    # Every fixed-rate event's lateness against the schedule is kept (coordinated omission
    # would show there).
    assert row["fixed"]["sent_late"]["count"] == row["fixed"]["events"]
    assert row["saturation"]["deliveries"] > 0
    assert row["server_survived"]


def test_the_broker_benchmark_runs_and_every_append_is_delivered(redis_url: str) -> None:
    """`python -m bench.broker` at smoke scale: it exits with an error if any append was
    not delivered back to its process, and prints one row per server."""
    completed = run_bench(
        "bench.broker",
        *("--servers", "ours", "--repeat", "1", "--url", redis_url),
        *("--sessions", "5", "--events", "100", "--rate", "2000"),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| ours | " in completed.stdout


def test_sessions_held_keeps_every_lease_held_and_skips_the_peers(
    tmp_path: Path, redis_url: str
) -> None:
    """`--scenario sessions_held`: the Redis row runs with every session's workflow leased
    by the load generator, still held at the end; the memory row is its baseline; a peer,
    which runs no workflows, is skipped."""
    output = tmp_path / "bench.json"
    completed = run_bench(
        *("bench", "--quick", "--scenario", "sessions_held"),
        *("--servers", "ours,ours-redis,naive", "--redis-url", redis_url),
        *("--output", str(output)),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    ours, redis, naive = json.loads(output.read_text())["rows"]
    assert naive["skipped"] == "a peer runs no workflows"
    assert "held_leases" not in ours
    assert redis["held_leases"] == redis["sessions"] > 0, redis
    for row in (ours, redis):
        assert "error" not in row and "skipped" not in row, row
        assert row["lost"] == row["duplicated"] == row["reordered"] == row["starved"] == 0
        assert row["publish_failed"] == 0
    assert "- sessions_held Redis adds" in completed.stdout


def test_repeat_reports_each_run_as_it_ends_then_the_median(tmp_path: Path) -> None:
    """`--repeat 2`: a line per server per round as each run ends, then the median row's;
    a server skipped in the first round is not run again, and its line has no median."""
    output = tmp_path / "bench.json"
    completed = run_bench(
        *("bench", "--quick", "--scenario", "fanout_sse", "--servers", "naive,seed"),
        *("--repeat", "2", "--output", str(output)),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [line for line in completed.stderr.splitlines() if line.startswith("[bench]")]
    naive = [line for line in lines if " naive " in line]
    seed = [line for line in lines if " seed " in line]
    assert [line.split("(")[1].split(")")[0] for line in naive] == [
        "round 1/2",
        "round 2/2",
        "median of 2",
    ], naive
    assert all("lost 0 dup 0" in line for line in naive), naive
    assert len(seed) == 2, seed
    assert "(round 1/2)" in seed[0] and "no SSE" in seed[0], seed
    assert "median" not in seed[1] and "no SSE" in seed[1], seed
    naive_row, seed_row = json.loads(output.read_text())["rows"]
    assert naive_row["repeats"] == 2 and naive_row["lost"] == 0, naive_row
    assert seed_row["skipped"] == "seed has no SSE", seed_row
