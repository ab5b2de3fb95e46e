"""The benchmark's medians over rounds: what a row of ``--repeat N`` stands for."""

from __future__ import annotations

from bench import report
from bench.suite import aggregate


def run(p99_ms: float, lost: int = 0) -> dict[str, object]:
    return {
        "scenario": "fanout",
        "server": "ours",
        "subscribers": 1000,
        "lost": lost,
        "fixed": {"latency": {"p99_ms": p99_ms}, "cpu_us_per_delivery": p99_ms / 2},
    }


def test_a_row_is_the_median_of_its_runs_field_by_field() -> None:
    row = aggregate([run(9.0), run(7.0), run(8.0)])
    assert row["fixed"] == {"latency": {"p99_ms": 8.0}, "cpu_us_per_delivery": 4.0}
    assert row["lost"] == 0 and isinstance(row["lost"], int)
    assert row["repeats"] == 3
    assert "failed_runs" not in row


def test_what_goes_wrong_in_one_round_shows_in_the_row() -> None:
    """Losses, duplicates, reordering and failed publishes are added up over the rounds,
    control events too, and a flag holds only if it held in every round: a median of
    three would turn one bad round into a clean row. Each round is kept as it was."""
    clean = {**run(8.0), "controls": {"heartbeat": 3}, "server_survived": True}
    bad = {
        **run(9.0, lost=3712),
        "duplicated": 40,
        "reordered": 5,
        "publish_failed": 12,
        "controls": {"heartbeat": 3, "slow_consumer": 1},
        "saturation": {"drained": False},
        "server_survived": False,
    }
    clean = {**clean, "duplicated": 0, "reordered": 0, "publish_failed": 0}
    clean["saturation"] = {"drained": True}
    row = aggregate([clean, bad, clean])
    assert (row["lost"], row["duplicated"], row["reordered"], row["publish_failed"]) == (
        3712,
        40,
        5,
        12,
    )
    assert row["controls"] == {"heartbeat": 9, "slow_consumer": 1}
    assert row["saturation"]["drained"] is False and row["server_survived"] is False
    assert row["fixed"]["latency"]["p99_ms"] == 8.0  # measurements stay medians
    assert row["rounds"] == [clean, bad, clean]
    (line,) = [line for line in report.throughput_table([row]) if line.startswith("| fanout")]
    assert "slow_consumer" in line and "server died" in line


def test_a_failed_run_is_left_out_of_the_medians_and_named_in_the_row() -> None:
    """A server that fails in round 3 of 3 is not run again: its row is the median of
    the two runs that completed, and the table says a run is missing and why."""
    failed = {"scenario": "fanout", "server": "ours", "error": "load generator failed: boom"}
    row = aggregate([run(9.0), run(7.0), failed])
    assert row["repeats"] == 2
    assert row["fixed"]["latency"]["p99_ms"] == 8.0
    assert "error" not in row
    assert row["failed_runs"] == ["load generator failed: boom"]
    (line,) = [line for line in report.throughput_table([row]) if line.startswith("| fanout")]
    assert "a run failed, left out of the medians: load generator failed: boom" in line


def test_one_completed_run_beside_a_failure_is_kept_as_it_was_measured() -> None:
    row = aggregate([run(7.123456789), {"scenario": "fanout", "server": "ours", "error": "x"}])
    assert row["fixed"]["latency"]["p99_ms"] == 7.123456789
    assert row["repeats"] == 1 and row["failed_runs"] == ["x"]
