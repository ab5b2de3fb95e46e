"""Does a running forecast delay other sessions' streams? (issue 3: "never stall the loop")

``python -m bench.forecast_probe`` starts ``python -m server`` on a free port,
starts a workflow whose demand agent fits every product over 26 weeks, and
while it runs publishes a probe event every 20 ms into another session and
times it from publish to arrival on that session's WebSocket subscriber. It
prints the probes' p50 / p99 / max latency and the same figures for an idle
server, so the difference is what the forecast costs other sessions.
The test suite asserts only a generous bound (250 ms); the figure lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGY = "5% off all products for 26 weeks"
PROBE_EVERY = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def running_server() -> AsyncIterator[str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # up to ~20 s for the imports
                try:
                    async with http.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


async def probe(
    base: str, http: aiohttp.ClientSession, session_id: str, until: asyncio.Event, limit: int
) -> list[float]:
    """Publish probes into ``session_id`` until ``until`` is set; their latencies in ms."""
    latencies: list[float] = []
    url = f"{base.replace('http', 'ws', 1)}/ws/orchestrator/{session_id}"
    async with http.ws_connect(url) as ws:
        n = 0
        while not until.is_set() and n < limit:
            n += 1
            sent = time.perf_counter()
            body = {"type": "progress", "agent": "probe", "status": str(n), "progress": 1}
            async with http.post(f"{base}/api/sessions/{session_id}/events", json=body) as r:
                assert r.status == 202, r.status
            while True:
                message = await ws.receive(timeout=30)
                event = json.loads(message.data)
                if event["type"] == "progress" and event["status"] == str(n):
                    break
            latencies.append((time.perf_counter() - sent) * 1000)
            await asyncio.sleep(PROBE_EVERY)  # pacing between probes
    return latencies


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{len(ordered)} probes: p50 {statistics.median(ordered):.2f} ms, "
        f"p99 {p99:.2f} ms, max {ordered[-1]:.2f} ms"
    )


async def main(idle_probes: int) -> None:
    async with running_server() as base, aiohttp.ClientSession() as http:
        never = asyncio.Event()
        idle = await probe(base, http, "probe-idle-0001", never, idle_probes)
        print(f"idle server:         {summary(idle)}")

        done = asyncio.Event()
        async with http.post(
            f"{base}/api/orchestrator/run-workflow",
            json={"strategy_description": STRATEGY, "session_id": "busy-forecast-01"},
        ) as r:
            assert r.status == 202, r.status

        async def watch() -> None:
            while True:
                async with http.get(f"{base}/api/sessions/busy-forecast-01") as r:
                    if (await r.json())["state"] in ("complete", "failed"):
                        done.set()
                        return
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        started = time.perf_counter()
        busy = await probe(base, http, "probe-busy-0001", done, 100_000)
        await watcher
        print(
            f"during the forecast: {summary(busy)} "
            f"(forecast ran {time.perf_counter() - started:.1f} s)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-probes", type=int, default=100)
    asyncio.run(main(parser.parse_args().idle_probes))
