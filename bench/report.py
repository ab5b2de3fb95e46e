"""Turn the suite's rows into markdown: one table per kind of scenario, then the targets."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]
DASH = "-"


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _get(row: JSON, *path: str) -> Any:
    value: Any = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _status(row: JSON) -> str | None:
    if "skipped" in row:
        return f"n/a: {row['skipped']}"
    if "error" in row:
        return f"failed: {row['error']}"
    return None


def _integrity_note(row: JSON) -> str:
    notes = []
    if row.get("starved"):
        notes.append(
            f"{row['starved']:,} of {row.get('subscribers', row.get('clients'))} "
            "subscribers got nothing"
        )
    if row.get("opened") is not None:
        wanted = row.get("subscribers", row.get("clients", row.get("connections")))
        if wanted and row["opened"] < wanted:
            notes.append(f"only {row['opened']:,} of {wanted:,} connected")
    if row.get("held_leases") is not None:
        notes.append(
            f"{row['held_leases']:,} of {row['sessions']:,} sessions' workflows still "
            "running in another process at the end (leases held)"
        )
    if row.get("publish_failed"):
        notes.append(f"{row['publish_failed']:,} publishes failed")
    controls = {k: v for k, v in (row.get("controls") or {}).items() if k != "heartbeat"}
    if controls:
        notes.append("control events " + ", ".join(f"{k} x{v}" for k, v in controls.items()))
    for phase in ("fixed", "saturation"):
        if _get(row, phase, "drained") is False:
            notes.append(f"{phase} phase did not drain")
    spread = _get(row, "fixed", "fanout_spread", "p50_ms")
    if spread and row.get("subscribers", 0) > row.get("sessions", 1):
        first = _get(row, "fixed", "first_arrival", "p50_ms")
        notes.append(f"p50 first arrival {first:.2f} ms, then {spread:.2f} ms to the last")
    late = _get(row, "fixed", "sent_late", "p99_ms")
    if late is not None and late >= 5.0:  # the event loop's timer alone makes about 2.3
        notes.append(f"load generator behind its schedule: sends {late:.2f} ms late (p99)")
    util = _get(row, "saturation", "loadgen_cpu_util")
    if util is not None and util >= 0.9:
        notes.append("load generator saturated")
    if row.get("listen_overflows"):
        notes.append(f"{row['listen_overflows']:,} SYNs dropped: listen queue full")
    if row.get("server_survived") is False:
        notes.append("server died")
    for error in row.get("failed_runs", ()):
        notes.append(f"a run failed, left out of the medians: {error}")
    return "; ".join(notes)


def _cpu(row: JSON, phase: str) -> str:
    total = _get(row, phase, "cpu_us_per_delivery")
    user = _get(row, phase, "user_us_per_delivery")
    if total is None:
        return DASH
    return f"{total:,.2f} ({user:,.2f})" if user is not None else f"{total:,.2f}"


def throughput_table(rows: list[JSON]) -> list[str]:
    lines = [
        "| scenario | server | subs | offered deliv/s | p50 ms | p99 ms | max ms | p99 read ms "
        "| CPU µs/deliv @fixed (user) | sat deliv/s | CPU µs/deliv @sat (user) | server CPU @sat "
        "| lost | dup | reordered | notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        head = f"| {row['scenario']} | {row['server']} "
        status = _status(row)
        if status:
            lines.append(head + "| " + " | ".join([DASH] * 13) + f" | {status} |")
            continue
        latency = _get(row, "fixed", "latency") or {}
        read = _get(row, "fixed", "latency_app") or {}
        util = _get(row, "saturation", "server_cpu_util")
        cells = [
            _num(row.get("subscribers")),
            _num(_get(row, "fixed", "offered_deliveries_s"), 0),
            _num(latency.get("p50_ms"), 2),
            _num(latency.get("p99_ms"), 2),
            _num(latency.get("max_ms"), 2),
            _num(read.get("p99_ms"), 2),
            _cpu(row, "fixed"),
            _num(_get(row, "saturation", "deliveries_s"), 0),
            _cpu(row, "saturation"),
            f"{util:.0%}" if util is not None else DASH,
            _num(row.get("lost")),
            _num(row.get("duplicated")),
            _num(row.get("reordered")),
        ]
        lines.append(head + "| " + " | ".join(cells) + f" | {_integrity_note(row)} |")
    return lines


def idle_table(rows: list[JSON]) -> list[str]:
    lines = [
        "| scenario | server | connections held | RSS before MiB | RSS after MiB "
        "| KiB per connection | live probe | notes |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        head = f"| {row['scenario']} | {row['server']} "
        status = _status(row)
        if status:
            lines.append(head + "| " + " | ".join([DASH] * 5) + f" | {status} |")
            continue
        per = row.get("rss_per_connection")
        cells = [
            f"{_num(row.get('held'))} / {_num(row.get('connections'))}",
            _num(row["rss_before"] / 2**20 if row.get("rss_before") else None, 1),
            _num(row["rss_after"] / 2**20 if row.get("rss_after") else None, 1),
            _num(per / 1024 if per is not None else None, 2),
            f"{_num(row.get('probe_received'))} / {_num(row.get('probe_sent'))}",
        ]
        lines.append(head + "| " + " | ".join(cells) + f" | {_integrity_note(row)} |")
    return lines


def storm_table(rows: list[JSON]) -> list[str]:
    lines = [
        "| scenario | server | clients | behind | fully replayed | replay time s "
        "| server CPU s | lost | dup | reordered | connect retries | notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        head = f"| {row['scenario']} | {row['server']} "
        status = _status(row)
        if status:
            lines.append(head + "| " + " | ".join([DASH] * 9) + f" | {status} |")
            continue
        cells = [
            _num(row.get("clients")),
            _num(row.get("behind")),
            f"{_num(row.get('complete'))} / {_num(row.get('clients'))}",
            _num(row.get("replay_s"), 3),
            _num(_get(row, "storm_window", "server_cpu_s"), 3),
            _num(row.get("lost")),
            _num(row.get("duplicated")),
            _num(row.get("reordered")),
            _num(row.get("connect_retries")),
        ]
        lines.append(head + "| " + " | ".join(cells) + f" | {_integrity_note(row)} |")
    return lines


def _find(rows: list[JSON], scenario: str, server: str) -> JSON | None:
    """The row of ``server`` (``ours`` also matches ``ours@REV``, the first one listed;
    never a ``+variant``)."""
    for row in rows:
        name = row["server"]
        if "+" in name or row["scenario"] != scenario or _status(row):
            continue
        if name == server or (server in ("ours", "ours-redis") and name.startswith(server + "@")):
            return row
    return None


def targets(rows: list[JSON]) -> list[str]:
    """The targets of issue 7, checked against this run (where both rows exist)."""
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for scenario in ("fanout", "fanout_sse", "sessions", "sessions_sse"):
        ours, naive = _find(rows, scenario, "ours"), _find(rows, scenario, "naive")
        if ours and naive:
            for phase in ("fixed", "saturation"):
                a = _get(ours, phase, "cpu_us_per_delivery")
                b = _get(naive, phase, "cpu_us_per_delivery")
                if a and b:
                    lines.append(
                        f"- {scenario} CPU/delivery @{phase}: ours {a:.2f} µs vs naive "
                        f"{b:.2f} µs = {a / b:.2f}x (target <= 0.5x): {verdict(a <= b / 2)}"
                    )
                ua = _get(ours, phase, "user_us_per_delivery")
                ub = _get(naive, phase, "user_us_per_delivery")
                if ua and ub:
                    lines.append(
                        f"  - user-space only: ours {ua:.2f} µs vs naive {ub:.2f} µs = "
                        f"{ua / ub:.2f}x"
                    )
    for scenario in ("fanout", "fanout_sse"):
        ours = _find(rows, scenario, "ours")
        p99 = _get(ours, "fixed", "latency", "p99_ms") if ours else None
        if ours and p99 is not None:
            offered = _get(ours, "fixed", "offered_deliveries_s")
            lines.append(
                f"- {scenario} p99 at {offered:,.0f} deliveries/s with {ours['subscribers']:,} "
                f"subscribers: {p99:.2f} ms (target < 10 ms): {verdict(p99 < 10)}"
            )
    for scenario, limit in (("idle_ws", 16), ("idle_sse", 8)):
        ours = _find(rows, scenario, "ours")
        if ours and ours.get("rss_per_connection") is not None:
            kib = ours["rss_per_connection"] / 1024
            lines.append(
                f"- {scenario} RSS per idle connection: {kib:.2f} KiB (target <= {limit} KiB): "
                f"{verdict(kib <= limit)}; held {ours.get('held'):,} of "
                f"{ours.get('connections'):,} (target 10,000): "
                f"{verdict(ours.get('held', 0) >= 10_000)}"
            )
    for scenario in ("storm", "storm_sse"):
        ours = _find(rows, scenario, "ours")
        if ours:
            replay = ours.get("replay_s")
            clean = not ours.get("lost") and not ours.get("duplicated")
            shown = f"{replay:.3f} s" if replay is not None else "not complete"
            lines.append(
                f"- {scenario}: {ours['clients']:,} clients {ours['behind']} events behind "
                f"replayed in {shown}, lost {ours.get('lost')}, duplicated "
                f"{ours.get('duplicated')} (target < 2 s, none lost or duplicated): "
                f"{verdict(replay is not None and replay < 2 and clean)}"
            )
    for scenario in ("fanout", "fanout_sse", "sessions", "sessions_sse", "sessions_held"):
        ours, redis = _find(rows, scenario, "ours"), _find(rows, scenario, "ours-redis")
        if ours and redis:
            a = _get(ours, "fixed", "latency", "p99_ms")
            b = _get(redis, "fixed", "latency", "p99_ms")
            if a is not None and b is not None:
                lines.append(
                    f"- {scenario} Redis adds {b - a:+.2f} ms to p99 (target <= 2 ms): "
                    f"{verdict(b - a <= 2)}"
                )
    return lines


def markdown(document: JSON) -> str:
    rows = document["rows"]
    kinds: dict[str, list[JSON]] = {"throughput": [], "idle": [], "storm": []}
    for row in rows:
        scenario = row["scenario"]
        if scenario.startswith("idle"):
            kinds["idle"].append(row)
        elif scenario.startswith("storm"):
            kinds["storm"].append(row)
        else:
            kinds["throughput"].append(row)
    m = document["machine"]
    out = [
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, Python {m['python']}; "
        f"load average before {document['load_before'][0]:.2f}, "
        f"after {document['load_after'][0]:.2f}"
        + ("; QUICK scales (smoke run, not figures)" if document.get("quick") else ""),
        "",
    ]
    notes = {row["server"]: row.get("server_note") for row in rows if row.get("server_note")}
    if notes:
        out += [f"- `{name}`: {note}" for name, note in notes.items()] + [""]
    if kinds["throughput"]:
        out += ["### Fan-out and many sessions", "", *throughput_table(kinds["throughput"]), ""]
    if kinds["idle"]:
        out += ["### Idle connections", "", *idle_table(kinds["idle"]), ""]
    if kinds["storm"]:
        out += ["### Reconnect storm", "", *storm_table(kinds["storm"]), ""]
    checked = targets(rows)
    if checked:
        out += ["### Targets (issue 7)", "", *checked]
    return "\n".join(out)


def progress_line(row: JSON, label: str = "") -> str:
    """One line on stderr per run or row: ``label`` says which (``round 2/3``, ``median of 3``)."""
    head = f"[bench] {row['scenario']:<13} {row['server']:<10} "
    if label:
        head += f"({label}) "
    status = _status(row)
    if status:
        return head + status
    parts = []
    if "fixed" in row:
        lat = _get(row, "fixed", "latency") or {}
        parts.append(
            f"p99 {lat.get('p99_ms')} ms, {_get(row, 'fixed', 'cpu_us_per_delivery')} µs/deliv "
            f"@fixed, {_get(row, 'saturation', 'deliveries_s')} deliv/s @sat"
        )
    if "rss_per_connection" in row and row["rss_per_connection"] is not None:
        parts.append(f"{row['rss_per_connection'] / 1024:.2f} KiB/conn, held {row.get('held')}")
    if "replay_s" in row:
        parts.append(f"replay {row['replay_s']} s")
    if "lost" in row:
        parts.append(f"lost {row['lost']} dup {row['duplicated']}")
    parts.append(f"load {row.get('load_before')}")
    return head + "; ".join(parts)
