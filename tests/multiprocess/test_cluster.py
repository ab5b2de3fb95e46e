"""Several real server processes on one Redis (issue 5, "Across processes"): any process
serves any session with the same ids, order and replay; a client whose process is
SIGKILLed resumes on another and misses nothing; two processes publishing into one
session keep ``seq`` gapless and one order everywhere; an event sent to two processes
with one ``Idempotency-Key`` is stored once; and when the process running a
workflow is SIGKILLed, subscribers elsewhere get ``workflow_interrupted`` within a
bounded time; and a workflow cancelled through another process stops where it runs.

Each test starts its own ``python -m server --broker redis`` processes (so that it can
kill them) on the shared test Redis, under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

from aiohttp import ClientSession, web

from tests.clients import (
    Event,
    EventStream,
    is_control_error,
    new_session_id,
    open_aiohttp_sse,
    open_aiohttp_ws,
    open_curl_sse,
    open_websockets_ws,
    progress,
    read_to_end,
    read_until,
    stored,
)
from tests.clients import final as final_body
from tests.multiprocess.conftest import Cluster
from tests.multiprocess.support import (
    INTERRUPTION_BOUND,
    LEASE_TTL,
    demand_started,
    read_until_dropped,
    run_workflow,
    subscribed_ws,
)
from tests.test_streams_end_to_end import assert_workflow_story
from tests.timing import EVENT_TIMEOUT, POLL_INTERVAL, WORKFLOW_TIMEOUT


def assert_one_story(stories: dict[str, list[Event]]) -> list[Event]:
    """Every client saw the same stored events (ids, seq, payloads), seq 1..n in order."""
    first = next(iter(stories.values()))
    assert [event["seq"] for event in stored(first)] == list(range(1, len(stored(first)) + 1))
    for name, events in stories.items():
        assert stored(events) == stored(first), f"{name} saw another story"
    return stored(first)


async def test_a_workflow_started_on_one_process_reaches_subscribers_on_the_others(
    cluster: Cluster,
) -> None:
    """A workflow started through process A reaches WebSocket and SSE subscribers on B and
    C (aiohttp and ``websockets``; SSE parsed raw from aiohttp and from ``curl -N``) as the
    same events with the same ids, live; a client connecting to A after the end gets the
    same story."""
    a, b, c = await cluster("a", "b", "c")
    session_id = new_session_id()
    async with ClientSession() as http, AsyncExitStack() as stack:
        ws_b = await stack.enter_async_context(open_aiohttp_ws(http, b.ws(session_id)))
        ws_c = await stack.enter_async_context(open_websockets_ws(c.ws(session_id)))
        sse_b = await stack.enter_async_context(open_aiohttp_sse(http, b.sse(session_id)))
        sse_c = await stack.enter_async_context(open_curl_sse(c.sse(session_id)))
        for ws in (ws_b, ws_c):
            await subscribed_ws(ws)  # SSE: subscribed once its response has begun
        assert sse_b.status == sse_c.status == 200

        await run_workflow(http, a, session_id)
        streams: dict[str, EventStream] = {
            "ws@b": ws_b,
            "ws@c": ws_c,
            "sse@b": sse_b,
            "curl-sse@c": sse_c,
        }
        seen = await asyncio.gather(*(read_to_end(stream) for stream in streams.values()))
        assert ws_b.close_code == ws_c.close_code == 1000
        async with open_aiohttp_sse(http, a.sse(session_id)) as late:
            after_the_end = await read_to_end(late)

    story = assert_one_story({**dict(zip(streams, seen, strict=True)), "late@a": after_the_end})
    assert_workflow_story(story, session_id)
    for events in seen:  # live: nothing but the story and heartbeats
        assert all(event["type"] == "heartbeat" for event in events if "id" not in event)


async def test_a_client_whose_process_is_killed_resumes_on_another_and_misses_nothing(
    cluster: Cluster,
) -> None:
    """Clients follow a workflow (running on C) through process A over WebSocket and SSE;
    A is SIGKILLed mid-workflow; each reconnects to B with the last id it saw
    (``?last_event_id=`` / ``Last-Event-ID``) and gets exactly the rest: no replay_gap, no
    event lost or repeated, against a witness on C that stayed connected."""
    a, b, c = await cluster("a", "b", "c")
    session_id = new_session_id()
    async with ClientSession() as http, open_aiohttp_ws(http, c.ws(session_id)) as witness:
        await subscribed_ws(witness)
        async with (
            open_aiohttp_ws(http, a.ws(session_id)) as ws,
            open_aiohttp_sse(http, a.sse(session_id)) as sse,
        ):
            await subscribed_ws(ws)
            await run_workflow(http, c, session_id)
            # C is a fresh process: its first demand forecast starts worker processes and
            # takes seconds, so A dies mid-workflow.
            before_ws = await read_until(ws, demand_started, WORKFLOW_TIMEOUT)
            before_sse = await read_until(sse, demand_started, WORKFLOW_TIMEOUT)
            a.kill()
            before_ws += await read_until_dropped(ws)  # what was in flight, then the drop
            before_sse += await read_until_dropped(sse)
        whole = asyncio.create_task(read_to_end(witness))
        last_ws, last_sse = stored(before_ws)[-1]["id"], stored(before_sse)[-1]["id"]
        async with (
            open_aiohttp_ws(http, b.ws(session_id, last_ws)) as ws,
            open_aiohttp_sse(http, b.sse(session_id), {"Last-Event-ID": last_sse}) as sse,
        ):
            after_ws, after_sse = await asyncio.gather(read_to_end(ws), read_to_end(sse))
        witnessed = await whole

    assert_workflow_story(witnessed, session_id)
    assert witnessed[-1]["type"] == "complete", "the workflow ran on C, which lives"
    for before, after in ((before_ws, after_ws), (before_sse, after_sse)):
        assert not any(is_control_error(event, "replay_gap") for event in after)
        assert stored(before) + stored(after) == stored(witnessed)
        assert stored(after), "A died before the end of the workflow"


async def test_two_processes_publishing_into_one_session_keep_one_gapless_order(
    cluster: Cluster,
) -> None:
    """Events POSTed concurrently to A and to B for one session get seq 1..n with no gap
    and no duplicate, the ids each publisher was answered with, and subscribers on A, B and
    C all see them in one and the same order."""
    a, b, c = await cluster("a", "b", "c")
    session_id = new_session_id()
    per_publisher = 40

    async def publish_all(http: ClientSession, server_name: str, url: str) -> list[Event]:
        async def one(n: int) -> Event:
            body = progress(n, agent=server_name)
            async with http.post(url, json=body) as response:
                assert response.status == 202, await response.text()
                answer: Event = await response.json()
                return answer

        # Several requests in flight per publisher, so appends interleave.
        return list(await asyncio.gather(*(one(n) for n in range(1, per_publisher + 1))))

    path = f"/api/sessions/{session_id}/events"
    async with ClientSession() as http, AsyncExitStack() as stack:
        streams = {
            name: await stack.enter_async_context(open_aiohttp_ws(http, server.ws(session_id)))
            for name, server in (("a", a), ("b", b), ("c", c))
        }
        for ws in streams.values():
            await subscribed_ws(ws)
        answers = await asyncio.gather(
            publish_all(http, "via-a", a.url(path)), publish_all(http, "via-b", b.url(path))
        )
        async with http.post(c.url(path), json=final_body()) as response:
            assert response.status == 202
        seen = await asyncio.gather(*(read_to_end(ws) for ws in streams.values()))

    story = assert_one_story(dict(zip(streams, seen, strict=True)))
    total = 2 * per_publisher + 1
    assert [event["seq"] for event in story] == list(range(1, total + 1))
    by_seq = {event["seq"]: event for event in story}
    for publisher, batch in zip(("via-a", "via-b"), answers, strict=True):
        for answer in batch:
            assert by_seq[answer["seq"]]["id"] == answer["id"]
            assert by_seq[answer["seq"]]["agent"] == publisher
    assert {event["agent"] for event in story[:-1]} == {"via-a", "via-b"}


async def test_the_same_events_sent_to_two_processes_with_their_keys_are_stored_once(
    cluster: Cluster,
) -> None:
    """A publisher behind a load balancer sends each event to A, and again, with the same
    ``Idempotency-Key``, to B, all at once: each event is stored once, both answers name
    it, and subscribers on both see each once, in one order."""
    a, b = await cluster("a", "b")
    session_id = new_session_id()
    path = f"/api/sessions/{session_id}/events"

    async def send(http: ClientSession, url: str, n: int) -> tuple[Event, str | None]:
        headers = {"Idempotency-Key": f"event-{n}"}
        async with http.post(url, json=progress(n), headers=headers) as response:
            assert response.status == 202, await response.text()
            answer: Event = await response.json()
            return answer, response.headers.get("Idempotent-Replayed")

    async with ClientSession() as http, AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(open_aiohttp_ws(http, server.ws(session_id)))
            for server in (a, b)
        ]
        for ws in streams:
            await subscribed_ws(ws)
        sent = await asyncio.gather(
            *(send(http, server.url(path), n) for n in range(1, 31) for server in (a, b))
        )
        async with http.post(a.url(path), json=final_body()) as response:
            assert response.status == 202
        seen = await asyncio.gather(*(read_to_end(ws) for ws in streams))

    story = assert_one_story({"a": seen[0], "b": seen[1]})
    assert len(story) == 31  # thirty events, each once, and the final one
    assert sorted(e["status"] for e in story[:-1]) == sorted(f"step {n}" for n in range(1, 31))
    for n in range(1, 31):
        (via_a, replayed_a), (via_b, replayed_b) = sent[2 * (n - 1)], sent[2 * (n - 1) + 1]
        assert via_a == via_b  # one event, one id
        assert sorted([replayed_a or "", replayed_b or ""]) == ["", "true"]


async def test_when_the_process_running_a_workflow_dies_subscribers_elsewhere_are_told(
    cluster: Cluster,
) -> None:
    """A is SIGKILLed while its workflow's demand agent runs: subscribers on B (WebSocket)
    and C (SSE) get the same final ``error`` with code ``workflow_interrupted`` (agent
    orchestrator) within lease_ttl + lease_check_interval + a few seconds, then the end of
    their stream: never an endless wait. The session snapshot says ``failed``."""
    a, b, c = await cluster("a", "b", "c")
    session_id = new_session_id()
    async with (
        ClientSession() as http,
        open_aiohttp_ws(http, b.ws(session_id)) as ws,
        open_aiohttp_sse(http, c.sse(session_id)) as sse,
    ):
        await subscribed_ws(ws)
        await run_workflow(http, a, session_id)
        # A is a fresh process: its first demand forecast starts worker processes and
        # takes seconds, during which it is killed.
        before = await read_until(ws, demand_started, WORKFLOW_TIMEOUT)
        a.kill()
        killed_at = time.monotonic()
        seen_ws, seen_sse = await asyncio.gather(
            read_to_end(ws, INTERRUPTION_BOUND), read_to_end(sse, INTERRUPTION_BOUND)
        )
        took = time.monotonic() - killed_at
        assert ws.close_code == 1000
        async with http.get(b.url(f"/api/sessions/{session_id}")) as response:
            snapshot = await response.json()

    story = stored(before + seen_ws)
    assert stored(seen_sse) == story
    last = story[-1]
    assert (last["type"], last["code"], last["agent"], last["final"]) == (
        "error",
        "workflow_interrupted",
        "orchestrator",
        True,
    )
    assert not any(event.get("final") for event in story[:-1])
    assert took < INTERRUPTION_BOUND
    assert snapshot["state"] == "failed"
    assert snapshot["error"]["code"] == "workflow_interrupted"


class HangingChatServer:
    """A local Chat Completions endpoint that never answers: it records that a request
    came, and that its client went away (aiohttp cancels the handler on disconnect)."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.abandoned = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.abandoned.set()
            raise
        raise AssertionError("unreachable")


async def test_a_workflow_cancelled_through_another_process_stops_there(
    cluster: Cluster,
) -> None:
    """A's workflow waits on its language model (a local server that never answers). B
    is asked to cancel it: B's subscriber gets the final ``workflow_cancelled`` at once
    and the end of its stream; A, at its next lease renewal, stops the work, so its
    request to the model is abandoned within ``lease_ttl / 3`` and a little, and counts
    the run as cancelled."""
    chat = HangingChatServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        llm = {"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": "sk-test"}
        (a,) = await cluster("a", env=llm)
        (b,) = await cluster("b")
        session_id = new_session_id()
        async with ClientSession() as http, open_aiohttp_ws(http, b.ws(session_id)) as ws:
            await subscribed_ws(ws)
            await run_workflow(http, a, session_id)
            await asyncio.wait_for(chat.received.wait(), EVENT_TIMEOUT)
            async with http.post(b.url(f"/api/sessions/{session_id}/cancel")) as response:
                assert response.status == 200, await response.text()
            cancelled_at = time.monotonic()
            events = await read_to_end(ws, EVENT_TIMEOUT)
            assert ws.ws.close_code == 1000
            last = stored(events)[-1]
            assert (last["type"], last["code"], last["final"]) == (
                "error",
                "workflow_cancelled",
                True,
            )
            await asyncio.wait_for(chat.abandoned.wait(), LEASE_TTL / 3 + EVENT_TIMEOUT)
            assert time.monotonic() - cancelled_at < LEASE_TTL / 3 + EVENT_TIMEOUT

            async def cancelled_on_a() -> bool:
                async with http.get(a.url("/metrics")) as response:
                    text = await response.text()
                return 'orchestrator_workflows_total{outcome="cancelled"} 1.0' in text

            async with asyncio.timeout(EVENT_TIMEOUT):
                while not await cancelled_on_a():
                    await asyncio.sleep(POLL_INTERVAL)
            async with http.get(a.url(f"/api/sessions/{session_id}")) as response:
                snapshot = await response.json()
        assert snapshot["state"] == "failed"
        assert snapshot["error"]["code"] == "workflow_cancelled"
        assert stored(events)[-1]["seq"] == snapshot["last_seq"]  # A stored nothing after
    finally:
        await runner.cleanup()
