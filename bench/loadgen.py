"""The load generator: ``python -m bench.loadgen`` runs ONE scenario against ONE server.

It reads the scenario as a JSON object on stdin and prints the figures as a
JSON object on stdout. The suite (:mod:`bench.suite`) starts it in its own
process, pinned to another core than the server's, with the server's pid so
that it can read the server's CPU time and RSS around each measured window.

Kinds of scenario:

- ``throughput``: ``sessions`` x ``subscribers_per_session`` subscribers;
  phase 0 warms up (until every subscriber got an event, bounded), phase 1
  publishes at a fixed ``rate`` (events/s) for ``fixed_s`` seconds (latency,
  CPU per delivery), phase 2 publishes as fast as the subscribers take it
  with at most ``window_events`` undelivered events (saturation).
- ``idle``: ``connections`` subscribers, each to its own session, that
  receive nothing; server RSS before and after.
- ``storm``: ``clients`` subscribers get ``warm_events``, all drop, the
  session moves on ``behind`` events, all reconnect at once resuming from
  their last id; time until every one has everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import psutil

from .clients import (
    JSON,
    Phase,
    Publisher,
    RawWSClient,
    Recorder,
    SSEClient,
    Tally,
    describe,
    raw_ws_subscribe,
    sse_subscribe,
    wait_until,
    ws_subscribe,
)

PHASES = ("warmup", "fixed", "saturation")


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (10,000 sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def session_ids(count: int, prefix: str = "") -> list[str]:
    run = secrets.token_hex(3)
    return [f"bench{prefix}{run}s{i:05d}" for i in range(count)]


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time of all the process's threads, in seconds, to the nanosecond.

    ``/proc/<pid>/task/*/schedstat`` counts in nanoseconds, where
    ``cpu_times()`` only moves in clock ticks (10 ms), too coarse for short
    windows; ``cpu_times()`` is the fallback where schedstat is missing.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{process.pid}/task"):
            with open(f"/proc/{process.pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        times = process.cpu_times()
        return float(times.user + times.system)
    return total / 1e9


def percentiles(samples: Sequence[int]) -> JSON:
    """p50, p99, max and mean of nanosecond samples, in milliseconds."""
    if not samples:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    ordered = sorted(samples)
    count = len(ordered)

    def at(q: float) -> float:
        return ordered[min(count - 1, int(q * count))] / 1e6

    return {
        "count": count,
        "p50_ms": round(at(0.50), 3),
        "p99_ms": round(at(0.99), 3),
        "max_ms": round(ordered[-1] / 1e6, 3),
        "mean_ms": round(statistics.fmean(ordered) / 1e6, 3),
    }


class Subscribers:
    """Opens, holds and closes the subscribers of one scenario (WebSocket or SSE)."""

    def __init__(
        self, port: int, transport: str, session_ids: list[str], ws_client: str = "raw"
    ) -> None:
        self.port = port
        self.transport = transport
        self.ws_client = ws_client
        self.raw_clients: list[RawWSClient] = []
        self.session_ids = session_ids
        self.http: aiohttp.ClientSession | None = None
        self.ws_tasks: set[asyncio.Task[None]] = set()
        self.sse_clients: list[SSEClient] = []
        self.errors: dict[str, int] = {}
        self.retries = 0

    async def __aenter__(self) -> Subscribers:
        if self.transport == "ws" and self.ws_client == "aiohttp":
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
            self.http = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close_all(timeout=10.0)
        if self.http is not None:
            await self.http.close()

    def _path(self, session: int) -> str:
        kind = "ws" if self.transport == "ws" else "sse"
        return f"/{kind}/orchestrator/{self.session_ids[session]}"

    async def open(self, tally: Tally, last_id: str | None = None, want_id: bool = False) -> None:
        path = self._path(tally.session)
        if self.transport == "sse":
            client = await sse_subscribe(self.port, path, tally, last_id)
            self.sse_clients.append(client)
            return
        if last_id:
            path += f"?last_event_id={last_id}"
        if self.http is None:
            self.raw_clients.append(await raw_ws_subscribe(self.port, path, tally, want_id))
            return
        url = f"http://127.0.0.1:{self.port}{path}"
        connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(ws_subscribe(self.http, url, tally, connected, want_id))
        self.ws_tasks.add(task)
        task.add_done_callback(self._ws_done)
        await connected

    def _ws_done(self, task: asyncio.Task[None]) -> None:
        self.ws_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._error(task.exception())  # type: ignore[arg-type]

    def _error(self, exc: BaseException) -> None:
        key = type(exc).__name__
        self.errors[key] = self.errors.get(key, 0) + 1

    async def open_many(
        self,
        tallies: Sequence[Tally],
        *,
        concurrency: int | None,
        timeout: float,
        last_ids: bool = False,
        want_id: bool = False,
        attempts: int = 1,
    ) -> int:
        """Open one connection per tally (at most ``concurrency`` handshakes at once,
        ``attempts`` tries each, all within ``timeout``); returns how many opened."""
        gate = asyncio.Semaphore(concurrency or len(tallies) or 1)

        async def one(tally: Tally) -> bool:
            for attempt in range(attempts):
                if attempt:
                    self.retries += 1
                    await asyncio.sleep(0.05 * attempt)
                try:
                    async with gate:
                        async with asyncio.timeout(10.0):
                            await self.open(tally, tally.last_id if last_ids else None, want_id)
                    return True
                except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                    self._error(exc)
            return False

        tasks = [asyncio.create_task(one(tally)) for tally in tallies]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
            self.errors["open_timeout"] = self.errors.get("open_timeout", 0) + len(pending)
        return sum(1 for task in done if not task.cancelled() and task.result())

    async def close_all(self, timeout: float) -> None:
        for client in self.sse_clients:
            if client.transport is not None:
                client.transport.close()
        self.sse_clients.clear()
        for raw in self.raw_clients:
            raw.close()
        self.raw_clients.clear()
        tasks = set(self.ws_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


class Meter:
    """Server and load-generator CPU time, and wall time, over one window."""

    def __init__(self, server: psutil.Process) -> None:
        self.server = server
        self.me = psutil.Process()
        self.wall0 = time.monotonic()
        self.server0 = cpu_seconds(server)
        self.ticks0 = server.cpu_times()
        self.me0 = cpu_seconds(self.me)

    def stop(self) -> JSON:
        wall = time.monotonic() - self.wall0
        server = cpu_seconds(self.server) - self.server0
        ticks = self.server.cpu_times()
        user = ticks.user - self.ticks0.user
        system = ticks.system - self.ticks0.system
        me = cpu_seconds(self.me) - self.me0
        coarse_ok = user + system >= 0.25
        return {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server, 4),
            # Kernel share of the server's CPU (clock ticks, so coarse on short windows):
            # on loopback a send() also pays the receiving side's TCP processing.
            # (None when the window holds too few 10 ms ticks to say.)
            "server_system_share": round(system / (user + system), 3) if coarse_ok else None,
            "server_user_s": round(user, 3) if coarse_ok else None,
            "server_cpu_util": round(server / wall, 3) if wall else None,
            "loadgen_cpu_util": round(me / wall, 3) if wall else None,
        }


# --- throughput -----------------------------------------------------------------------


async def throughput(cfg: JSON, server: psutil.Process) -> JSON:
    port = cfg["port"]
    sessions = cfg["sessions"]
    per_session = cfg["subscribers_per_session"]
    ids = session_ids(sessions)
    recorder = Recorder(len(PHASES))
    tallies = [Tally(recorder, s) for s in range(sessions) for _ in range(per_session)]
    result: JSON = {"subscribers": len(tallies), "sessions": sessions}
    count_held: Callable[[], Awaitable[int]] | None = None
    async with contextlib.AsyncExitStack() as stack:
        if cfg.get("lease_holder_redis"):
            from .lease_holder import held_leases  # imports the server: only for these rows

            count_held = await stack.enter_async_context(
                held_leases(cfg["lease_holder_redis"], ids)
            )
        subs = await stack.enter_async_context(
            Subscribers(port, cfg["transport"], ids, cfg["ws_client"])
        )
        started = time.monotonic()
        opened = await subs.open_many(
            tallies, concurrency=cfg["connect_concurrency"], timeout=cfg["connect_timeout"]
        )
        result["opened"] = opened
        result["connect_s"] = round(time.monotonic() - started, 3)
        publisher = Publisher(port, ids, cfg["publish_connections"])
        await publisher.start()
        try:
            # Phase 0: warm up until every subscriber has one event (bounded).
            deadline = time.monotonic() + cfg["warmup_timeout"]
            rounds = 0
            while rounds < 1000 and time.monotonic() < deadline:
                rounds += 1
                for s in range(sessions):
                    publisher.publish(s, 0)
                await publisher.settle(5.0)
                if await wait_until(lambda: all(t.received for t in tallies), 0.25):
                    break
            receivers = [0] * sessions
            for tally in tallies:
                if tally.received:
                    receivers[tally.session] += 1
            result["receivers"] = sum(receivers)
            result["warmup_rounds"] = rounds
            live = [s for s in range(sessions) if receivers[s]]
            first_n = [n + 1 for n in publisher.n]
            if not live:
                result["error"] = "no subscriber received any event"
                return result

            # Phase 1: a fixed rate, below saturation.
            await publisher.reconnect()
            before = list(publisher.n)
            meter = Meter(server)
            late = await paced(publisher, live, cfg["rate"], cfg["fixed_s"], phase=1)
            await publisher.settle(5.0)
            expected1 = sum(receivers[s] * (publisher.n[s] - before[s]) for s in range(sessions))
            fixed = recorder.phases[1]
            drained = await wait_until(lambda: fixed.deliveries >= expected1, cfg["drain_timeout"])
            window = meter.stop()
            result["fixed"] = {
                **window,
                "rate_events_s": cfg["rate"],
                "offered_deliveries_s": round(cfg["rate"] * len(tallies) / sessions, 1),
                "events": sum(publisher.n[s] - before[s] for s in range(sessions)),
                "expected_deliveries": expected1,
                "deliveries": fixed.deliveries,
                "drained": drained,
                "cpu_us_per_delivery": _per_delivery(window, fixed.deliveries),
                "user_us_per_delivery": _user_per_delivery(window, fixed.deliveries),
                "latency": percentiles(fixed.latencies),
                "latency_app": percentiles(fixed.app_latencies),
                "sent_late": percentiles(late),
                **_spread(fixed),
            }

            # Phase 2: saturation, with a bounded number of undelivered events.
            await publisher.reconnect()
            before = list(publisher.n)
            meter = Meter(server)
            start_deliveries = recorder.deliveries
            await saturate(publisher, live, receivers, recorder, cfg)
            window = meter.stop()
            delivered = recorder.deliveries - start_deliveries
            sat = recorder.phases[2]
            result["saturation"] = {
                **window,
                "events": sum(publisher.n[s] - before[s] for s in range(sessions)),
                "deliveries": delivered,
                "deliveries_s": round(delivered / window["wall_s"], 1),
                "cpu_us_per_delivery": _per_delivery(window, delivered),
                "user_us_per_delivery": _user_per_delivery(window, delivered),
                "latency": percentiles(sat.latencies),
                "latency_app": percentiles(sat.app_latencies),
            }
            await publisher.settle(5.0)
            expected2 = sum(receivers[s] * (publisher.n[s] - before[s]) for s in range(sessions))
            result["saturation"]["drained"] = await wait_until(
                lambda: sat.deliveries >= expected2, cfg["drain_timeout"]
            )
        finally:
            publisher.close()
        result.update(_integrity(tallies, first_n, publisher.n))
        result["publish_failed"] = publisher.failed
        result["publish_statuses"] = publisher.statuses
        result["controls"] = recorder.controls
        result["connect_errors"] = subs.errors
        if count_held is not None:
            # Counted at the end: the renewals kept every lease, and no session was ended.
            result["held_leases"] = await count_held()
    return result


def _spread(phase: Phase) -> JSON:
    """How long the server took to reach an event's first subscriber, and then its last."""
    first, spread = phase.spreads()
    return {"first_arrival": percentiles(first), "fanout_spread": percentiles(spread)}


def _per_delivery(window: JSON, deliveries: int) -> float | None:
    if not deliveries:
        return None
    cpu: float = window["server_cpu_s"]
    return round(cpu * 1e6 / deliveries, 2)


def _user_per_delivery(window: JSON, deliveries: int) -> float | None:
    """User-space CPU only (the part a server's design controls; the rest is the kernel)."""
    if not deliveries or window["server_user_s"] is None:
        return None
    user: float = window["server_user_s"]
    return round(user * 1e6 / deliveries, 2)


def _integrity(tallies: Sequence[Tally], first_n: Sequence[int], last_n: Sequence[int]) -> JSON:
    """Loss, duplicates and order over the measured events (``first_n..last_n`` per session)."""
    lost = dups = reordered = starved = 0
    for tally in tallies:
        first, last = first_n[tally.session], last_n[tally.session]
        got = tally.count_between(first, last)
        lost += (last - first + 1) - got
        dups += tally.dups
        reordered += tally.reordered
        if not got:
            starved += 1
    return {"lost": lost, "duplicated": dups, "reordered": reordered, "starved": starved}


# At least one scheduler tick (4 ms at 250 Hz, 10 ms at 100 Hz): see paced().
_JITTER_S = 0.010


async def paced(
    publisher: Publisher, order: Sequence[int], rate: float, duration: float, phase: int
) -> list[int]:
    """Publish ``rate`` events/s, round robin over ``order``, for ``duration`` s; return
    how late each was written after it was due (ns): what of the latency is the load
    generator's own.

    Requests are written on time whether or not earlier answers came back, at most
    2,000 unanswered (no coordinated omission). An event carries the time it was
    written, so its latency is the server's; how late it was written against the
    schedule is returned, and a row notes a load generator that fell behind. (Counted
    from the schedule, every server's latency would gain the event loop's millisecond
    timer: about 1 ms at p50, 2.3 at p99, alike for all.)

    Event k is due at a random moment in the first ``_JITTER_S`` of its own
    ``1/rate`` slot: the rate is exact and consecutive events stay at least
    ``1/rate - _JITTER_S`` apart, but they fall at every phase of the kernel's
    scheduler tick. Linux splits a process's CPU time into user and system by
    sampling at the tick; with a period in step with the tick (50 ms is 12.5
    ticks at 250 Hz), every sample would land at the same few points of each
    event's work, and the split would be whatever those points happen to be in
    that run.
    """
    total = max(1, int(rate * duration))
    slot = 1.0 / rate
    jitter = min(slot, _JITTER_S)
    rng = random.Random(phase)
    due = [k * slot + rng.random() * jitter for k in range(total)]
    start = time.monotonic()
    start_ns = time.time_ns()  # the same moment on the clock the receivers stamp with
    hard_stop = start + duration * 3 + 5
    sent = 0
    late: list[int] = []
    while sent < total and time.monotonic() < hard_stop:
        now = time.monotonic() - start
        while sent < total and due[sent] <= now and len(publisher.in_flight) < 2000:
            publisher.publish(order[sent % len(order)], phase)
            late.append(time.time_ns() - start_ns - round(due[sent] * 1e9))
            sent += 1
        if sent < total:
            await asyncio.sleep(max(0.0, start + due[sent] - time.monotonic()))
    return late


async def saturate(
    publisher: Publisher,
    order: Sequence[int],
    receivers: Sequence[int],
    recorder: Recorder,
    cfg: JSON,
) -> None:
    """Publish as fast as deliveries allow for ``sat_s`` seconds, round robin over ``order``,
    keeping at most ``window_events`` events not yet delivered to all their subscribers."""
    phase = recorder.phases[2]
    window = cfg["window_events"] * max(receivers) if receivers else 0
    in_flight_cap = cfg["window_events"]
    end = time.monotonic() + cfg["sat_s"]
    expected = 0
    i = 0
    while time.monotonic() < end:
        budget = 256
        while (
            budget
            and expected - phase.deliveries < window
            and len(publisher.in_flight) < in_flight_cap
        ):
            session = order[i % len(order)]
            i += 1
            publisher.publish(session, 2)
            expected += receivers[session]
            budget -= 1
        # Budget spent: just let the loop run; window full: give deliveries time to land.
        await asyncio.sleep(0.0005 if budget else 0)


# --- idle -----------------------------------------------------------------------------


async def idle(cfg: JSON, server: psutil.Process) -> JSON:
    port = cfg["port"]
    count = cfg["connections"]
    ids = session_ids(count)
    warm_ids = session_ids(min(200, count), prefix="w")
    recorder = Recorder(len(PHASES))
    result: JSON = {"connections": count}
    # Warm the server's code paths and allocator with a few connections, then let go.
    async with Subscribers(port, cfg["transport"], warm_ids, cfg["ws_client"]) as warm:
        warm_tallies = [Tally(recorder, s) for s in range(len(warm_ids))]
        await warm.open_many(warm_tallies, concurrency=50, timeout=30.0)
    await asyncio.sleep(cfg["warm_pause_s"])
    rss0 = await _settled_rss(server)
    tallies = [Tally(recorder, s) for s in range(count)]
    async with Subscribers(port, cfg["transport"], ids, cfg["ws_client"]) as subs:
        started = time.monotonic()
        opened = await subs.open_many(
            tallies, concurrency=cfg["connect_concurrency"], timeout=cfg["connect_timeout"]
        )
        result["connect_s"] = round(time.monotonic() - started, 3)
        result["opened"] = opened
        rss1 = await _settled_rss(server)
        await asyncio.sleep(cfg["hold_s"])
        result["held"] = sum(1 for t in tallies if t.open)
        result["rss_before"] = rss0
        result["rss_after"] = rss1
        result["rss_per_connection"] = round((rss1 - rss0) / opened, 1) if opened else None
        result["server_fds"] = server.num_fds()
        # Prove the connections are live: one event to a sample of them.
        step = max(1, count // cfg["probe_sessions"])
        sample = list(range(0, count, step))
        publisher = Publisher(port, ids, 4)
        await publisher.start()
        try:
            for s in sample:
                publisher.publish(s, 1)
            await publisher.settle(10.0)
            await wait_until(lambda: all(tallies[s].received for s in sample), 10.0)
        finally:
            publisher.close()
        result["probe_sent"] = len(sample)
        result["probe_received"] = sum(1 for s in sample if tallies[s].received)
        result["connect_errors"] = subs.errors
        result["controls"] = recorder.controls
    return result


async def _settled_rss(server: psutil.Process, timeout: float = 10.0) -> int:
    """The server's RSS once it stops moving (two readings 0.5 s apart within 32 KiB)."""
    deadline = time.monotonic() + timeout
    last = server.memory_info().rss
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = server.memory_info().rss
        if abs(now - last) <= 32 * 1024:
            return int(now)
        last = now
    return int(last)


# --- reconnect storm --------------------------------------------------------------------


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full
    (``TcpExt ListenOverflows``, machine-wide); the client then retries its SYN a
    second later, which shows up as a storm that takes just over a second."""
    try:
        with open("/proc/net/netstat") as stats:
            lines = [line.split() for line in stats if line.startswith("TcpExt:")]
        names, values = lines[0], lines[1]
        return int(values[names.index("ListenOverflows")])
    except (OSError, IndexError, ValueError):
        return None


async def storm(cfg: JSON, server: psutil.Process) -> JSON:
    port = cfg["port"]
    count = cfg["clients"]
    sessions = cfg["sessions"]
    ids = session_ids(sessions)
    recorder = Recorder(len(PHASES))
    tallies = [Tally(recorder, i % sessions) for i in range(count)]
    result: JSON = {"clients": count, "sessions": sessions, "behind": cfg["behind"]}
    publisher = Publisher(port, ids, min(sessions, 8))
    await publisher.start()
    try:
        async with Subscribers(port, cfg["transport"], ids, cfg["ws_client"]) as subs:
            result["opened"] = await subs.open_many(
                tallies,
                concurrency=cfg["connect_concurrency"],
                timeout=cfg["connect_timeout"],
                want_id=True,
            )
            await publisher.reconnect()
            for _ in range(cfg["warm_events"]):
                await asyncio.gather(*(publisher.publish(s, 0) for s in range(sessions)))
            warm = cfg["warm_events"]
            await wait_until(lambda: all(t.last_n >= warm for t in tallies), 10.0)
            result["warm_complete"] = sum(1 for t in tallies if t.last_n >= warm)
            # Everyone drops at once...
            await subs.close_all(timeout=10.0)
            await wait_until(lambda: not any(t.open for t in tallies), 10.0)
            await asyncio.sleep(0.2)
            # ... the sessions move on ...
            await publisher.reconnect()
            for _ in range(cfg["behind"]):
                await asyncio.gather(*(publisher.publish(s, 0) for s in range(sessions)))
            for tally in tallies:
                tally.target_n = publisher.n[tally.session]
            # ... and everyone comes back at once, resuming from its last id.
            meter = Meter(server)
            overflows = listen_overflows()
            t0 = time.time_ns()  # the clock of Tally.done_at
            reopened = await subs.open_many(
                tallies,
                concurrency=None,
                timeout=cfg["storm_timeout"],
                last_ids=True,
                want_id=True,
                attempts=3,
            )
            remaining = cfg["storm_timeout"] - (time.time_ns() - t0) / 1e9
            complete = await wait_until(
                lambda: all(t.done_at for t in tallies), max(0.0, remaining), poll=0.001
            )
            window = meter.stop()
            after = listen_overflows()
            if overflows is not None and after is not None:
                result["listen_overflows"] = after - overflows
            result["reopened"] = reopened
            result["complete"] = sum(1 for t in tallies if t.done_at)
            result["replay_s"] = (
                round((max(t.done_at for t in tallies) - t0) / 1e9, 3) if complete else None
            )
            result["storm_window"] = window
            result["connect_retries"] = subs.retries
            result["connect_errors"] = subs.errors
    finally:
        publisher.close()
    result.update(_integrity(tallies, [1] * sessions, publisher.n))
    result["controls"] = recorder.controls
    result["publish_failed"] = publisher.failed
    return result


SCENARIO_KINDS = {"throughput": throughput, "idle": idle, "storm": storm}


async def run(cfg: JSON) -> JSON:
    server = psutil.Process(cfg["server_pid"])
    kind = SCENARIO_KINDS[cfg["kind"]]
    started = time.monotonic()
    try:
        async with asyncio.timeout(cfg["scenario_timeout"]):
            result = await kind(cfg, server)
    except TimeoutError:
        result = {"error": f"scenario exceeded {cfg['scenario_timeout']} s"}
    except Exception as exc:
        result = {"error": describe(exc)}
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    return result


def main() -> None:
    cfg = json.loads(sys.stdin.read())
    cfg["open_files_limit"] = raise_open_files_limit()
    result = asyncio.run(run(cfg))
    result["loadgen_cpu"] = sorted(os.sched_getaffinity(0))
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
