"""The demo page in a real browser: a whole workflow over WebSocket and over SSE, and a
server-side drop in the middle of one that the page recovers from without losing or
repeating an event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, expect

from server.brokers.memory import MemoryBroker
from server.config import Settings
from tests.browser.support import (
    LiveServer,
    PageProblems,
    PausingBroker,
    refuse_websocket_upgrades,
    running_server,
)
from tests.timing import EVENT_TIMEOUT, WORKFLOW_TIMEOUT

AGENTS = ("extraction", "demand", "inventory", "pricing")
WORKFLOW_MS = WORKFLOW_TIMEOUT * 1000
EVENT_MS = EVENT_TIMEOUT * 1000


def demand_started(event: dict[str, object]) -> bool:
    """Where a PausingBroker holds the workflow: the demand agent has started."""
    return event["type"] == "agent_status" and event["agent"] == "demand"


async def run_on_page(page: Page, server: LiveServer, query: str = "") -> None:
    """Open the page and press Run with the prefilled strategy."""
    await page.goto(f"{server.url}/{query}")
    await expect(page.locator("#strategy")).to_have_value("15% off outdoor furniture for 8 weeks")
    await page.wait_for_function("document.documentElement.dataset.ready === 'true'")
    await page.click("#run")


async def wait_finished(page: Page) -> None:
    await page.wait_for_function(
        "window.__stream.run === 'complete' || window.__stream.run === 'failed'",
        timeout=WORKFLOW_MS,
    )
    banner = await page.locator("#error-banner").text_content()
    assert await page.evaluate("window.__stream.run") == "complete", banner


async def stream_state(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate(
        """() => ({
            sessionId: window.__stream.sessionId,
            transport: window.__stream.transport,
            state: window.__stream.state,
            reconnects: window.__stream.reconnects,
            replayGaps: window.__stream.replayGaps,
            seqCounts: window.__stream.seqCounts,
            types: window.__stream.events.map((e) => e.type),
            final: window.__stream.events.filter((e) => e.final === true).length,
        })"""
    )
    return state


async def server_last_seq(server: LiveServer, session_id: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/api/sessions/{session_id}") as response,
    ):
        assert response.status == 200
        snapshot = await response.json()
    assert snapshot["state"] == "complete"
    last_seq: int = snapshot["last_seq"]
    return last_seq


async def assert_every_event_once(page: Page, server: LiveServer) -> dict[str, Any]:
    """The page received every stored event of the session exactly once, the final last."""
    state = await stream_state(page)
    last_seq = await server_last_seq(server, state["sessionId"])
    counts = {int(seq): n for seq, n in state["seqCounts"].items()}
    assert counts == dict.fromkeys(range(1, last_seq + 1), 1)
    assert state["final"] == 1
    assert state["replayGaps"] == 0
    assert state["state"] == "closed"
    return state


async def assert_finished_page(page: Page) -> None:
    """Every agent card at 100 % and done; the overall bar full; the chart drawn."""
    for agent in AGENTS:
        card = page.locator(f'.agent[data-agent="{agent}"]')
        await expect(card).to_have_attribute("data-progress", "100")
        await expect(card).to_have_attribute("data-state", "done")
        await expect(card.locator('[role="progressbar"]')).to_have_attribute("aria-valuenow", "100")
    await expect(page.locator("#overall-bar")).to_have_attribute("aria-valuenow", "100")
    await expect(page.locator("#overall-percent")).to_have_text("100%")
    await expect(page.locator("#error-banner")).to_be_hidden()
    await expect(page.locator("#result")).to_be_visible()

    chart = page.locator("#chart svg#forecast-chart")
    await expect(chart).to_be_visible()
    for kind in ("history-line", "forecast-line", "interval-band"):
        d = await chart.locator(f"path.{kind}").get_attribute("d")
        assert d is not None and d.startswith("M") and d.count("L") >= 8, (kind, d)
    await expect(page.locator("#kpis .kpi").first).to_be_visible()
    await expect(page.locator("#parameters dd").first).to_be_visible()
    await expect(page.locator("#inventory table tbody tr").first).to_be_visible()
    await expect(page.locator("#pricing table tbody tr").first).to_be_visible()


async def test_full_workflow_over_websocket(
    page: Page, live_server: LiveServer, artifacts: Path
) -> None:
    """Run from the page over WebSocket: every card reaches 100 %, the chart is drawn, and
    each stored event arrives once; a screenshot of the finished page is saved."""
    await run_on_page(page, live_server)
    await wait_finished(page)
    await assert_finished_page(page)
    state = await assert_every_event_once(page, live_server)
    assert state["transport"] == "websocket"
    assert state["reconnects"] == 0
    connection = page.locator("#connection")
    await expect(connection).to_have_attribute("data-transport", "websocket")
    await expect(connection).to_have_attribute("data-state", "closed")
    await page.screenshot(path=str(artifacts / "demo-finished.png"), full_page=True)

    # Responsive: on a phone nothing sticks out sideways (wide tables scroll in their box).
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.wait_for_function("document.documentElement.scrollWidth <= 390")
    await page.screenshot(path=str(artifacts / "demo-finished-mobile.png"), full_page=True)


async def test_forced_sse_fallback(page: Page, live_server: LiveServer) -> None:
    """With ``?transport=sse`` the page uses EventSource and ends the same way."""
    await run_on_page(page, live_server, "?transport=sse")
    await wait_finished(page)
    await assert_finished_page(page)
    state = await assert_every_event_once(page, live_server)
    assert state["transport"] == "sse"
    assert state["reconnects"] == 0
    await expect(page.locator("#connection")).to_have_attribute("data-transport", "sse")


async def test_falls_back_to_sse_when_websocket_is_refused(
    page: Page, browser_settings: Settings, page_problems: PageProblems
) -> None:
    """When the WebSocket handshake fails (a proxy answers 502), ``auto`` switches to SSE
    and the workflow is shown in full."""
    page_problems.allow(r"WebSocket connection to .* failed")
    async with running_server(browser_settings, middlewares=[refuse_websocket_upgrades]) as server:
        await run_on_page(page, server)
        await wait_finished(page)
        await assert_finished_page(page)
        state = await assert_every_event_once(page, server)
    assert state["transport"] == "sse"
    assert state["reconnects"] == 1  # the switch itself


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_server_drop_mid_workflow_resumes_without_loss_or_repeats(
    page: Page, browser_settings: Settings, transport: str
) -> None:
    """The server ends every stream (1001 / SSE response ended) while the demand agent runs;
    the page reconnects, resumes after its last event, and ends with each event once."""

    broker = PausingBroker(browser_settings, pause_after=demand_started)
    async with running_server(browser_settings, broker=broker) as server:
        await run_on_page(page, server, f"?transport={transport}")
        await page.wait_for_function(
            """() => window.__stream.events.some(
                   (e) => e.type === 'agent_status' && e.agent === 'demand')""",
            timeout=WORKFLOW_MS,
        )
        assert broker.paused.is_set()
        seen_before = await page.evaluate("Object.keys(window.__stream.seqCounts).length")

        server.hub.close_all("shutdown")  # what a server going away does to every stream
        broker.resume()  # the workflow goes on while the page is disconnected

        await page.wait_for_function("window.__stream.reconnects >= 1", timeout=EVENT_MS)
        await wait_finished(page)
        await assert_finished_page(page)
        state = await assert_every_event_once(page, server)
        assert state["transport"] == transport
        assert state["reconnects"] >= 1
        assert len(state["seqCounts"]) > seen_before
        reconnects = await page.locator("#connection").get_attribute("data-reconnects")
        assert reconnects is not None and int(reconnects) >= 1


async def test_refused_run_shows_the_servers_message(
    page: Page, browser_settings: Settings, page_problems: PageProblems
) -> None:
    """A run the server refuses (422: strategy too long) shows its ``error`` text."""
    page_problems.allow(r"status of 422")
    async with running_server(browser_settings.replace(max_strategy_length=10)) as server:
        await page.goto(server.url + "/")
        await page.click("#run")
        await expect(page.locator("#error-banner")).to_be_visible()
        await expect(page.locator("#error-text")).to_have_text(
            "strategy_description is longer than 10 characters."
        )
        await expect(page.locator("#run")).to_be_enabled()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")


async def test_failed_workflow_shows_the_friendly_error(
    page: Page, live_server: LiveServer
) -> None:
    """A session that ends with a final ``error`` shows its user-facing text and details
    in the banner, and marks the failed agent (the page follows it with ``?session=``)."""
    session_id = "failing-session-0001"
    # The page follows an existing session (an unknown one is "no longer available").
    await publish(
        live_server,
        session_id,
        {"type": "agent_status", "agent": "demand", "status": "Starting", "progress": 0},
    )
    await page.goto(f"{live_server.url}/?session={session_id}")
    await page.wait_for_function("window.__stream.state === 'open'")
    events = [
        {
            "type": "error",
            "agent": "demand",
            "code": "agent_failed",
            "error": "The demand agent could not finish its work.",
            "details": "Reference abc123",
        },
        {
            "type": "error",
            "agent": "orchestrator",
            "code": "workflow_failed",
            "error": "The forecast could not be completed: the demand agent failed.",
            "details": "Reference abc123",
            "final": True,
        },
    ]
    async with aiohttp.ClientSession() as http:
        for event in events:
            url = f"{live_server.url}/api/sessions/{session_id}/events"
            async with http.post(url, json=event) as response:
                assert response.status == 202, await response.text()
    await page.wait_for_function("window.__stream.run === 'failed'", timeout=EVENT_MS)
    await expect(page.locator("#error-banner")).to_be_visible()
    await expect(page.locator("#error-text")).to_have_text(
        "The forecast could not be completed: the demand agent failed."
    )
    await expect(page.locator("#error-details")).to_have_text("Reference abc123")
    await expect(page.locator('.agent[data-agent="demand"]')).to_have_attribute(
        "data-state", "failed"
    )
    await expect(page.locator("#result")).to_be_hidden()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_with_stream_tokens_the_page_follows_with_the_token_it_is_given(
    page: Page, browser_settings: Settings, page_problems: PageProblems, transport: str
) -> None:
    """When the server requires stream tokens, the stream opened before the run is refused;
    the page reopens it with the token from run-workflow and shows the whole workflow."""
    if "stream_token_secret" not in Settings.__dataclass_fields__:
        pytest.skip("this tree has no stream tokens (Settings.stream_token_secret)")
    page_problems.allow(r"status of 401|EventSource's response has a")
    settings = browser_settings.replace(stream_token_secret="test-secret-0123456789")
    async with running_server(settings) as server:
        await run_on_page(page, server, f"?transport={transport}")
        await wait_finished(page)
        await assert_finished_page(page)
        state = await stream_state(page)
        counts = {int(seq): n for seq, n in state["seqCounts"].items()}
        assert set(counts.values()) == {1}
        assert max(counts) == len(counts)
        assert state["transport"] == transport


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_followed_session_that_another_agent_ends_shows_as_finished(
    page: Page, live_server: LiveServer, transport: str
) -> None:
    """``/?session=<id>`` follows a session fed by another service; its final event may be
    a ``complete`` from that service's own agent, not the orchestrator's: the page shows
    the run as finished and Run can be pressed again."""
    session_id = "followed-0001"
    started = {"type": "progress", "agent": "crawler", "status": "Started", "progress": 0}
    await publish(live_server, session_id, started)
    await page.goto(f"{live_server.url}/?session={session_id}&transport={transport}")
    await page.wait_for_function("document.documentElement.dataset.ready === 'true'")
    async with aiohttp.ClientSession() as http:
        for body in (
            {"type": "progress", "agent": "crawler", "status": "Crawling", "progress": 40},
            {"type": "complete", "agent": "crawler", "status": "Crawled", "final": True},
        ):
            url = f"{live_server.url}/api/sessions/{session_id}/events"
            async with http.post(url, json=body) as response:
                assert response.status == 202, await response.text()
    await page.wait_for_function("window.__stream.state === 'closed'", timeout=EVENT_MS)
    assert await page.evaluate("window.__stream.run") == "complete"
    await expect(page.locator("#run")).to_be_enabled()
    await expect(page.locator("#error-banner")).to_be_hidden()


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_cancel_stops_the_run_and_the_page_shows_it_cancelled(
    page: Page, browser_settings: Settings, transport: str
) -> None:
    """Cancel, pressed while the demand agent runs: the server ends the session with
    ``workflow_cancelled``; the page shows the run as cancelled (no error banner, the
    running agent stopped), hides Cancel and lets Run be pressed again."""

    broker = PausingBroker(browser_settings, pause_after=demand_started)
    async with running_server(browser_settings, broker=broker) as server:
        await run_on_page(page, server, f"?transport={transport}")
        await page.wait_for_function(
            "window.__stream.events.some((e) => e.agent === 'demand')", timeout=WORKFLOW_MS
        )
        await expect(page.locator("#cancel")).to_be_visible()
        await page.click("#cancel")
        await page.wait_for_function("window.__stream.run === 'cancelled'", timeout=EVENT_MS)
        await expect(page.locator("#overall-status")).to_have_text("Cancelled")
        await expect(page.locator("#error-banner")).to_be_hidden()
        await expect(page.locator("#cancel")).to_be_hidden()
        await expect(page.locator("#run")).to_be_enabled()
        await expect(page.locator('.agent[data-agent="demand"]')).to_have_attribute(
            "data-state", "stopped"
        )
        await page.wait_for_function("window.__stream.state === 'closed'", timeout=EVENT_MS)
        state = await stream_state(page)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{server.url}/api/sessions/{state['sessionId']}") as response,
        ):
            snapshot = await response.json()
    assert snapshot["state"] == "failed" and snapshot["error"]["code"] == "workflow_cancelled"
    counts = {int(seq): n for seq, n in state["seqCounts"].items()}
    assert counts == dict.fromkeys(range(1, snapshot["last_seq"] + 1), 1)
    assert state["final"] == 1


@pytest.mark.parametrize(
    ("status", "code"), [(503, "service_unavailable"), (409, "no_workflow")], ids=str
)
async def test_a_cancel_the_server_refuses_shows_why_and_can_be_sent_again(
    page: Page, browser_settings: Settings, page_problems: PageProblems, status: int, code: str
) -> None:
    """The cancel is refused (the browser is given that answer by Playwright's routing): a
    503, or a 409 other than ``session_ended`` (the one refusal that means "it ended
    first"). The page shows the server's message by the button (not the "could not
    finish" banner: the run goes on), and Cancel can be pressed again, which then cancels
    it, and the message goes."""

    refused = {"error": "The cancel was refused.", "code": code}
    page_problems.allow(rf"status of {status}")  # the browser logs the refused request
    broker = PausingBroker(browser_settings, pause_after=demand_started)
    async with running_server(browser_settings, broker=broker) as server:
        await page.route(
            "**/api/sessions/*/cancel",
            lambda route: route.fulfill(status=status, json={**refused, "reference": "r1"}),
        )
        await run_on_page(page, server)
        await expect(page.locator("#cancel")).to_be_visible(timeout=WORKFLOW_MS)
        await page.click("#cancel")
        await expect(page.locator("#cancel-error")).to_contain_text(refused["error"])
        await expect(page.locator("#cancel-error")).to_contain_text("reference r1")
        await expect(page.locator("#error-banner")).to_be_hidden()  # the run goes on
        await expect(page.locator("#cancel")).to_be_enabled()
        await expect(page.locator("#cancel")).to_have_text("Cancel")
        assert await page.evaluate("window.__stream.run") == "running"

        await page.unroute("**/api/sessions/*/cancel")
        await page.click("#cancel")
        await page.wait_for_function("window.__stream.run === 'cancelled'", timeout=EVENT_MS)
        await expect(page.locator("#cancel-error")).to_be_hidden()
        await expect(page.locator("#error-banner")).to_be_hidden()


async def publish(server: LiveServer, session_id: str, *events: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http:
        for body in events:
            url = f"{server.url}/api/sessions/{session_id}/events"
            async with http.post(url, json=body) as response:
                assert response.status == 202, await response.text()


@pytest.mark.parametrize("code", ["workflow_interrupted", "workflow_failed"])
async def test_a_final_error_stops_the_cards_still_running(
    page: Page, live_server: LiveServer, code: str
) -> None:
    """A run that ends with a final error while an agent runs (the server shut down:
    ``workflow_interrupted``, or a service's own final error) shows that agent stopped,
    not running for ever; the agent that had finished stays done."""
    session_id = f"interrupted-{code}"
    await publish(
        live_server,
        session_id,
        {"type": "complete", "agent": "extraction", "status": "Read", "progress": 100},
        {"type": "agent_status", "agent": "demand", "status": "Forecasting", "progress": 30},
    )
    await page.goto(f"{live_server.url}/?session={session_id}")
    demand = page.locator('.agent[data-agent="demand"]')
    await expect(demand).to_have_attribute("data-state", "running")
    await publish(
        live_server,
        session_id,
        {
            "type": "error",
            "agent": "orchestrator",
            "code": code,
            "error": "The forecast was interrupted.",
            "details": "",
            "final": True,
        },
    )
    await page.wait_for_function("window.__stream.run === 'failed'", timeout=EVENT_MS)
    await expect(page.locator("#error-text")).to_have_text("The forecast was interrupted.")
    await expect(demand).to_have_attribute("data-state", "stopped")
    await expect(demand.locator(".badge")).to_have_text("Stopped")
    await expect(page.locator('.agent[data-agent="extraction"]')).to_have_attribute(
        "data-state", "done"
    )


GONE = "This forecast is no longer available; run it again."


async def assert_run_gone(page: Page) -> None:
    """The run is shown as over, with the "no longer available" message, and Run works."""
    await page.wait_for_function("window.__stream.run === 'failed'", timeout=EVENT_MS)
    await expect(page.locator("#error-text")).to_have_text(GONE)
    await expect(page.locator("#run")).to_be_enabled()
    await expect(page.locator("#cancel")).to_be_hidden()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_following_an_unknown_session_says_it_is_not_available(
    page: Page, live_server: LiveServer, page_problems: PageProblems, transport: str
) -> None:
    """``/?session=<id>`` naming a session the server does not have (expired, lost in a
    restart, never started): the page says so instead of showing "Running…" for ever."""
    page_problems.allow(r"status of 404")
    await page.goto(
        f"{live_server.url}/?session=no-such-session-0001&transport={transport}&gone_after_ms=200"
    )
    await assert_run_gone(page)


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_session_gone_while_the_page_was_away_ends_the_run(
    page: Page, browser_settings: Settings, page_problems: PageProblems, transport: str
) -> None:
    """The page loses its stream, and when it comes back the server no longer has the
    session (expired; a memory broker's server restarted): the resume gets ``replay_gap``
    and nothing more. The page asks the server, hears 404, and ends the run with a clear
    message rather than "Starting…" for ever."""
    page_problems.allow(r"status of 404")
    now = [0.0]
    broker = MemoryBroker(
        browser_settings.buffer_size, browser_settings.session_ttl, clock=lambda: now[0]
    )
    session_id = "expiring-session-0001"
    async with running_server(browser_settings, broker=broker) as server:
        await publish(
            server,
            session_id,
            {"type": "agent_status", "agent": "demand", "status": "Forecasting", "progress": 30},
        )
        await page.goto(
            f"{server.url}/?session={session_id}&transport={transport}&gone_after_ms=200"
        )
        await page.wait_for_function("window.__stream.events.length >= 1", timeout=EVENT_MS)
        now[0] += browser_settings.session_ttl * 2
        assert broker.sweep() == 1  # the session expires
        server.hub.close_all("shutdown")  # and the page's stream drops
        await page.wait_for_function("window.__stream.replayGaps >= 1", timeout=EVENT_MS)
        await assert_run_gone(page)
        await expect(page.locator('.agent[data-agent="demand"]')).not_to_have_attribute(
            "data-state", "running"
        )


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_session_unknown_for_a_moment_is_not_given_up(
    page: Page, browser_settings: Settings, page_problems: PageProblems, transport: str
) -> None:
    """The server does not know the session when the page asks (a link opened just before
    its first event; a store that restarted empty, before the running workflow's next
    event), and then its events come: the page follows it to its end, it does not give
    it up on the first 404."""
    page_problems.allow(r"status of 404")
    session_id = "late-session-0001"
    async with running_server(browser_settings) as server:
        url = f"{server.url}/?session={session_id}&transport={transport}&gone_after_ms=3000"
        async with page.expect_response(
            lambda response: (
                f"/api/sessions/{session_id}" in response.url and response.status == 404
            )
        ):
            await page.goto(url)
        await publish(
            server,
            session_id,
            {"type": "agent_status", "agent": "demand", "status": "Forecasting", "progress": 30},
        )
        await publish(
            server,
            session_id,
            {"type": "complete", "agent": "orchestrator", "status": "Done", "progress": 100,
             "final": True, "data": {"result": {}}},
        )  # fmt: skip
        await page.wait_for_function("window.__stream.run === 'complete'", timeout=EVENT_MS)
        await expect(page.locator("#error-text")).not_to_have_text(GONE)


async def test_a_cancel_answered_session_not_found_ends_the_run(
    page: Page, browser_settings: Settings, page_problems: PageProblems
) -> None:
    """Cancel answered 404 ``session_not_found``: the run cannot go on, so the page ends
    it with the "no longer available" message, not "The forecast goes on"."""
    page_problems.allow(r"status of 404")
    broker = PausingBroker(browser_settings, pause_after=demand_started)
    async with running_server(browser_settings, broker=broker) as server:
        await page.route(
            "**/api/sessions/*/cancel",
            lambda route: route.fulfill(
                status=404,
                json={
                    "error": "No such session (it never started, or has expired).",
                    "code": "session_not_found",
                    "reference": "r1",
                },
            ),
        )
        await run_on_page(page, server)
        await expect(page.locator("#cancel")).to_be_visible(timeout=WORKFLOW_MS)
        await page.click("#cancel")
        await assert_run_gone(page)
        await expect(page.locator("#cancel-error")).to_be_hidden()
