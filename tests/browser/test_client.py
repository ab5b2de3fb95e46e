"""The browser client (``/static/client.js``) in a real browser, against scripted servers:
when it reconnects and when it stops, how it resumes, drops duplicates, handles
``replay_gap``, and parses SSE ``error`` frames apart from connection errors."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.async_api import Page, Route, WebSocketRoute

from tests.browser.support import LiveServer, PageProblems
from tests.timing import EVENT_TIMEOUT

SID = "client-test-0001"
TIMESTAMP = "2026-11-27T20:01:02.123456Z"

# Runs the client until it stops for good; returns what it saw.
RUN_CLIENT = """
async ({ sessionId, transport }) => {
  const { OrchestratorStream } = await import("/static/client.js");
  const seen = { events: [], gaps: [], states: [] };
  const stream = new OrchestratorStream(sessionId, {
    transport,
    backoff: { initialMs: 5, maxMs: 20 },
    onEvent: { "*": (event) => seen.events.push(event) },
    onReplayGap: (event) => seen.gaps.push(event),
    onStateChange: (info) => seen.states.push(info.state),
  });
  const info = await stream.done;
  return { ...info, ...seen };
}
"""


def event(seq: int, *, epoch: str = "e1", final: bool = False) -> dict[str, Any]:
    base: dict[str, Any] = {
        "session_id": SID,
        "timestamp": TIMESTAMP,
        "agent": "orchestrator",
        "data": {},
        "id": f"{epoch}-{seq}",
        "seq": seq,
    }
    if final:
        return {**base, "type": "complete", "status": "Done", "progress": 100, "final": True}
    return {**base, "type": "progress", "status": f"step {seq}", "progress": seq}


def control_error(code: str) -> dict[str, Any]:
    return {
        "type": "error",
        "session_id": SID,
        "timestamp": TIMESTAMP,
        "code": code,
        "error": "Some earlier events are no longer available.",
        "details": "",
        "agent": None,
        "final": False,
    }


@dataclass
class Connection:
    frames: list[dict[str, Any]]
    close_code: int | None = None  # None: leave the connection open
    close: bool = True


@dataclass
class ScriptedWebSocketServer:
    """Plays one scripted connection per WebSocket the page opens; records the URLs."""

    script: list[Connection]
    urls: list[str] = field(default_factory=list)

    async def __call__(self, ws: WebSocketRoute) -> None:
        self.urls.append(ws.url)
        assert len(self.urls) <= len(self.script), f"unexpected connection {ws.url}"
        connection = self.script[len(self.urls) - 1]
        for frame in connection.frames:
            ws.send(json.dumps(frame))
        if connection.close and connection.close_code is not None:
            await ws.close(code=connection.close_code, reason="scripted")


async def run_client(page: Page, server: LiveServer, transport: str) -> dict[str, Any]:
    await page.goto(server.url + "/")
    async with asyncio.timeout(EVENT_TIMEOUT):
        result: dict[str, Any] = await page.evaluate(
            RUN_CLIENT, {"sessionId": SID, "transport": transport}
        )
    return result


def seqs(result: dict[str, Any]) -> list[int]:
    return [e["seq"] for e in result["events"] if "seq" in e]


@pytest.mark.parametrize(("code", "reason"), [(1000, "ended"), (1008, "refused")])
async def test_stops_for_good_on_1000_and_1008(
    page: Page, live_server: LiveServer, code: int, reason: str
) -> None:
    """Close 1000 (stream ended) and 1008 (refused) end the client: no reconnect."""
    server = ScriptedWebSocketServer([Connection([event(1)], close_code=code)])
    await page.route_web_socket("**/ws/orchestrator/**", server)
    result = await run_client(page, live_server, "websocket")
    assert result["closeReason"] == reason
    assert result["reconnects"] == 0
    assert len(server.urls) == 1
    assert seqs(result) == [1]


@pytest.mark.parametrize("code", [1001, 1011, 1013, None])
async def test_reconnects_resumes_and_drops_duplicates(
    page: Page, live_server: LiveServer, code: int | None
) -> None:
    """On 1001, 1011, 1013 or a close without a code the client reconnects with
    ``?last_event_id=`` of its last stored event, and drops an event it already has."""
    first = Connection([event(1), event(2)], close_code=code)
    if code is None:
        first = Connection([event(1), event(2)], close_code=1000, close=False)

    async def serve(ws: WebSocketRoute) -> None:
        await server(ws)
        if code is None and len(server.urls) == 1:
            await ws.close()  # no status code: what the client sees as abnormal

    server = ScriptedWebSocketServer(
        [first, Connection([event(2), event(3), event(4, final=True)])]
    )
    await page.route_web_socket("**/ws/orchestrator/**", serve)
    result = await run_client(page, live_server, "websocket")
    assert seqs(result) == [1, 2, 3, 4]
    assert server.urls[1].endswith(f"/ws/orchestrator/{SID}?last_event_id=e1-2")
    assert result["reconnects"] == 1
    assert result["closeReason"] == "final"
    assert result["lastEventId"] == "e1-4"
    assert "reconnecting" in result["states"]
    assert result["transport"] == "websocket"  # it had worked: no fallback


async def test_replay_gap_accepts_the_replay_again_and_tells_the_app(
    page: Page, live_server: LiveServer
) -> None:
    """After ``replay_gap`` the client forgets what it has seen (the server replays what
    it retains, here a new epoch starting at seq 1) and calls ``onReplayGap`` once."""
    server = ScriptedWebSocketServer(
        [
            Connection([event(1), event(2)], close_code=1001),
            Connection(
                [
                    control_error("replay_gap"),
                    event(1, epoch="e2"),
                    event(2, epoch="e2"),
                    event(3, epoch="e2", final=True),
                ]
            ),
        ]
    )
    await page.route_web_socket("**/ws/orchestrator/**", server)
    result = await run_client(page, live_server, "websocket")
    assert len(result["gaps"]) == 1
    assert result["gaps"][0]["code"] == "replay_gap"
    assert seqs(result) == [1, 2, 1, 2, 3]
    assert not [e for e in result["events"] if e.get("code") == "replay_gap"]
    assert result["closeReason"] == "final"


async def test_final_event_ends_the_stream_without_waiting_for_the_close(
    page: Page, live_server: LiveServer
) -> None:
    """The final event stops the client at once; nothing reconnects."""
    server = ScriptedWebSocketServer([Connection([event(1), event(2, final=True)], close=False)])
    await page.route_web_socket("**/ws/orchestrator/**", server)
    result = await run_client(page, live_server, "websocket")
    assert result["closeReason"] == "final"
    assert result["state"] == "closed"
    assert result["reconnects"] == 0
    assert len(server.urls) == 1


def sse_body(frames: list[dict[str, Any]]) -> str:
    out = ["retry: 10\n\n"]
    for frame in frames:
        head = f"id: {frame['id']}\n" if "id" in frame else ""
        out.append(f"{head}event: {frame['type']}\ndata: {json.dumps(frame)}\n\n")
    return "".join(out)


async def test_sse_resumes_by_query_and_reads_error_frames_as_events(
    page: Page, live_server: LiveServer
) -> None:
    """Over SSE: a response that ends without the final event is resumed with
    ``?last_event_id=``; an ``event: error`` frame (here ``replay_gap``) is an event, not a
    connection error."""
    bodies = [
        sse_body([event(1), event(2)]),
        sse_body([control_error("replay_gap"), event(1), event(2), event(3, final=True)]),
    ]
    urls: list[str] = []

    async def serve(route: Route) -> None:
        urls.append(route.request.url)
        await route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
            body=bodies[len(urls) - 1],
        )

    await page.route("**/sse/orchestrator/**", serve)
    result = await run_client(page, live_server, "sse")
    assert urls[0].endswith(f"/sse/orchestrator/{SID}")
    assert urls[1].endswith(f"/sse/orchestrator/{SID}?last_event_id=e1-2")
    assert len(result["gaps"]) == 1
    assert seqs(result) == [1, 2, 1, 2, 3]
    assert result["closeReason"] == "final"
    assert result["transport"] == "sse"
    assert result["reconnects"] == 1


async def test_an_sse_request_never_answered_is_given_up_and_retried(
    page: Page, live_server: LiveServer
) -> None:
    """An SSE request that no one answers (a proxy, a network black hole) counts as failed
    after ``connectTimeoutMs``, as a hung WebSocket handshake does: the client retries, and
    the answered retry streams to the end."""
    urls: list[str] = []
    never = asyncio.Event()

    async def serve(route: Route) -> None:
        urls.append(route.request.url)
        if len(urls) == 1:
            await never.wait()  # the first request is never answered
            return
        await route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=sse_body([event(1), event(2, final=True)]),
        )

    await page.route("**/sse/orchestrator/**", serve)
    await page.goto(live_server.url + "/")
    try:
        async with asyncio.timeout(EVENT_TIMEOUT):
            result: dict[str, Any] = await page.evaluate(
                """async (sessionId) => {
                    const { OrchestratorStream } = await import("/static/client.js");
                    const events = [];
                    const stream = new OrchestratorStream(sessionId, {
                      transport: "sse",
                      connectTimeoutMs: 300,
                      backoff: { initialMs: 5, maxMs: 20 },
                      onEvent: { "*": (event) => events.push(event) },
                    });
                    return { ...(await stream.done), events };
                }""",
                SID,
            )
    finally:
        never.set()
    assert len(urls) == 2
    assert seqs(result) == [1, 2]
    assert result["closeReason"] == "final"
    assert result["reconnects"] == 1


async def test_a_stream_closed_before_it_started_stays_closed(
    page: Page, live_server: LiveServer
) -> None:
    """``autoStart: false``, ``close()``, then ``start()``: no connection, and no ``online``
    listener left behind holding the closed stream."""
    urls: list[str] = []
    await page.route("**/orchestrator/**", lambda route: urls.append(route.request.url))
    await page.goto(live_server.url + "/")
    result = await page.evaluate(
        """async (sessionId) => {
            const { OrchestratorStream } = await import("/static/client.js");
            const added = [];
            const add = globalThis.addEventListener;
            globalThis.addEventListener = (type, ...rest) => {
                added.push(type);
                return add.call(globalThis, type, ...rest);
            };
            try {
                const stream = new OrchestratorStream(sessionId, { autoStart: false });
                stream.close();
                stream.start();
                const info = await stream.done;
                return { state: stream.state, closeReason: info.closeReason, added };
            } finally {
                globalThis.addEventListener = add;
            }
        }""",
        SID,
    )
    assert result == {"state": "closed", "closeReason": "client", "added": []}
    assert urls == []


async def test_backoff_is_exponential_with_full_jitter(page: Page, live_server: LiveServer) -> None:
    """Delays are uniform in [0, min(max, initial * 2^attempt)]."""
    await page.goto(live_server.url + "/")
    delays = await page.evaluate(
        """async () => {
            const { backoffDelay } = await import("/static/client.js");
            const b = { initialMs: 100, maxMs: 3000 };
            const top = [...Array(8).keys()].map((a) => backoffDelay(a, b, () => 0.999999));
            const low = [...Array(8).keys()].map((a) => backoffDelay(a, b, () => 0));
            return { top, low };
        }"""
    )
    assert delays["low"] == [0] * 8
    assert delays["top"] == [99, 199, 399, 799, 1599, 2999, 2999, 2999]


@pytest.mark.parametrize(
    ("statuses", "reason", "requests"),
    [
        ([401], "refused", 2),  # the EventSource, then the probe that reads its status
        ([204], "ended", 2),
        ([503, 503, 200], "final", 5),  # overload is retried
    ],
)
async def test_sse_refusals_stop_and_overload_retries(
    page: Page,
    live_server: LiveServer,
    page_problems: PageProblems,
    statuses: list[int],
    reason: str,
    requests: int,
) -> None:
    """An SSE connection refused before it opens is asked for its status once: 4xx stops
    the client (like WebSocket 1008), 204 means the stream has ended, 503 is retried."""
    page_problems.allow(r"status of (401|503)|EventSource's response has a")
    urls: list[str] = []

    async def serve(route: Route) -> None:
        urls.append(route.request.url)
        # Each failed EventSource request is followed by its probe: both get the same answer.
        status = statuses[min((len(urls) - 1) // 2, len(statuses) - 1)]
        if status == 200:
            await route.fulfill(
                status=200,
                headers={"Content-Type": "text/event-stream"},
                body=sse_body([event(1, final=True)]),
            )
        elif status == 204:
            await route.fulfill(status=204)
        else:
            await route.fulfill(
                status=status,
                content_type="application/json",
                body=json.dumps({"error": "No.", "code": "refused"}),
            )

    await page.route("**/sse/orchestrator/**", serve)
    result = await run_client(page, live_server, "sse")
    assert result["closeReason"] == reason
    assert len(urls) == requests


async def test_close_called_by_the_final_events_handler_keeps_final(
    page: Page, live_server: LiveServer
) -> None:
    """A handler that calls ``stream.close()`` on the final event (as one does with a plain
    EventSource) leaves ``closeReason`` "final" and ``finalEvent`` set: the stream did end
    with its final event."""
    server = ScriptedWebSocketServer([Connection([event(1), event(2, final=True)], close=False)])
    await page.route_web_socket("**/ws/orchestrator/**", server)
    await page.goto(live_server.url + "/")
    async with asyncio.timeout(EVENT_TIMEOUT):
        result = await page.evaluate(
            """async (sessionId) => {
                const { OrchestratorStream } = await import("/static/client.js");
                const seen = [];
                const stream = new OrchestratorStream(sessionId, {
                  transport: "websocket",
                  onEvent: {
                    complete: (e, s) => {
                      seen.push([s.closeReason, s.finalEvent && s.finalEvent.seq]);
                      if (e.final) s.close();
                    },
                  },
                });
                const info = await stream.done;
                return { info, seen, finalSeq: stream.finalEvent && stream.finalEvent.seq };
            }""",
            SID,
        )
    assert result["info"]["closeReason"] == "final"
    assert result["finalSeq"] == 2
    assert result["seen"] == [[None, 2]]  # the final event is recorded before handlers run


def heartbeat() -> dict[str, Any]:
    return {"type": "heartbeat", "session_id": SID, "timestamp": TIMESTAMP}


MAX_RECONNECTS_CLIENT = """
async (sessionId) => {
  const { OrchestratorStream } = await import("/static/client.js");
  const stream = new OrchestratorStream(sessionId, {
    transport: "websocket",
    maxReconnects: 2,
    backoff: { initialMs: 5, maxMs: 20 },
  });
  return await stream.done;
}
"""


@pytest.mark.parametrize("proof", ["event", "heartbeat"])
async def test_max_reconnects_counts_consecutive_failures_only(
    page: Page, live_server: LiveServer, proof: str
) -> None:
    """``maxReconnects`` caps the failed attempts in a row, not all reconnects ever: four
    separate drops, each healed at once (the new connection delivers a stored event or a
    heartbeat), do not make a client with ``maxReconnects: 2`` give up."""
    script = []
    for n in range(1, 5):
        frames = [event(n)] if proof == "event" or n == 1 else [heartbeat()]
        script.append(Connection(frames, close_code=1001))
    script.append(Connection([event(5, final=True)]))
    server = ScriptedWebSocketServer(script)
    await page.route_web_socket("**/ws/orchestrator/**", server)
    await page.goto(live_server.url + "/")
    async with asyncio.timeout(EVENT_TIMEOUT):
        result = await page.evaluate(MAX_RECONNECTS_CLIENT, SID)
    assert result["closeReason"] == "final"
    assert result["reconnects"] == 4
    assert len(server.urls) == 5


async def test_max_reconnects_gives_up_after_that_many_failures_in_a_row(
    page: Page, live_server: LiveServer
) -> None:
    """Connections that deliver nothing before they drop are failures in a row: with
    ``maxReconnects: 2`` the client reconnects twice, then stops with ``gave_up``."""
    server = ScriptedWebSocketServer(
        [Connection([event(1)], close_code=1001)] + [Connection([], close_code=1011)] * 3
    )
    await page.route_web_socket("**/ws/orchestrator/**", server)
    await page.goto(live_server.url + "/")
    async with asyncio.timeout(EVENT_TIMEOUT):
        result = await page.evaluate(MAX_RECONNECTS_CLIENT, SID)
    assert result["closeReason"] == "gave_up"
    assert len(server.urls) == 3  # the first, which worked, then two failed reconnects


async def test_sse_waits_as_long_as_a_503s_retry_after_asks(
    page: Page, live_server: LiveServer, page_problems: PageProblems
) -> None:
    """An SSE request refused with 503 and ``Retry-After: 1`` is retried no sooner than a
    second later, however short the back-off (here at most 20 ms)."""
    page_problems.allow(r"status of 503|EventSource's response has a")
    times: list[float] = []

    async def serve(route: Route) -> None:
        times.append(asyncio.get_running_loop().time())
        if len(times) <= 2:  # the EventSource, then the probe that reads its status
            await route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                content_type="application/json",
                body=json.dumps({"error": "Busy.", "code": "service_unavailable"}),
            )
            return
        await route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=sse_body([event(1, final=True)]),
        )

    await page.route("**/sse/orchestrator/**", serve)
    result = await run_client(page, live_server, "sse")
    assert result["closeReason"] == "final"
    assert len(times) == 3
    assert times[2] - times[1] >= 0.9, times
