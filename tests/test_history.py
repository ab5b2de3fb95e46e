"""``GET /api/sessions/{id}/events``: a session's retained events over plain HTTP, as a
stream's replay would send them, page by page, on both brokers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.config import Settings
from tests.clients import (
    AppClient,
    Event,
    final,
    new_session_id,
    progress,
    publish,
    publish_story,
)
from tests.conftest import BOTH_BROKERS, ServerFactory

pytestmark = BOTH_BROKERS


async def history(client: AppClient, session_id: str, query: str = "") -> dict[str, Any]:
    response = await client.get(f"/api/sessions/{session_id}/events{query}")
    text = await response.text()
    assert response.status == 200, text
    assert response.content_type == "application/json"
    answer: dict[str, Any] = json.loads(text)
    return answer


def seqs(page: dict[str, Any]) -> list[int]:
    return [event["seq"] for event in page["events"]]


async def test_the_whole_story_as_the_streams_carry_it(client: AppClient) -> None:
    """Every retained event, oldest first, each exactly as a stream sends it (the same
    JSON object, id and seq included), and whether the session has ended."""
    session_id = new_session_id()
    answers = await publish_story(client, session_id, 4)
    page = await history(client, session_id)
    assert seqs(page) == [1, 2, 3, 4, 5]
    assert [e["id"] for e in page["events"]] == [a["id"] for a in answers]
    assert page["events"][-1]["final"] is True and page["events"][0]["session_id"] == session_id
    assert (page["gap"], page["more"], page["ended"], page["last_seq"]) == (False, False, True, 5)
    async with client.get(f"/sse/orchestrator/{session_id}") as response:
        streamed = [
            json.loads(line[len("data: ") :])
            for line in (await response.text()).splitlines()
            if line.startswith("data: ")
        ]
    assert page["events"] == [e for e in streamed if e["type"] != "heartbeat"]


async def test_after_an_id_and_page_by_page(client: AppClient) -> None:
    session_id = new_session_id()
    answers = await publish_story(client, session_id, 6)
    assert seqs(await history(client, session_id, f"?after={answers[2]['id']}")) == [4, 5, 6, 7]

    pages, after = [], ""
    while True:
        page = await history(client, session_id, f"?limit=3{after}")
        pages.append(seqs(page))
        if not page["more"]:
            break
        after = f"&after={page['events'][-1]['id']}"
    assert pages == [[1, 2, 3], [4, 5, 6], [7]]


async def test_a_running_session_answers_what_it_has_so_far(client: AppClient) -> None:
    session_id = new_session_id()
    first = await publish(client, session_id, progress(1))
    page = await history(client, session_id, f"?after={first['id']}")
    assert (seqs(page), page["gap"], page["more"], page["ended"]) == ([], False, False, False)
    await publish(client, session_id, progress(2))
    assert seqs(await history(client, session_id, f"?after={first['id']}")) == [2]


@pytest.mark.parametrize(
    "after", ["not-an-id", "0123456789ab-1", "%E2%9C%93"], ids=["junk", "another epoch", "utf-8"]
)
async def test_a_position_that_cannot_be_served_is_a_gap_with_everything(
    client: AppClient, after: str
) -> None:
    """As on a stream (``replay_gap``): a malformed id, or one of another epoch, gets the
    whole retained story, marked as a gap."""
    session_id = new_session_id()
    await publish_story(client, session_id, 2)
    page = await history(client, session_id, f"?after={after}")
    assert (seqs(page), page["gap"]) == ([1, 2, 3], True)


@pytest.mark.parametrize("limit", ["3", "0003", "4", "99", "9" * 5000])
async def test_a_limit_is_read_as_a_number_and_capped_by_the_buffer(
    client: AppClient, limit: str
) -> None:
    session_id = new_session_id()
    await publish_story(client, session_id, 2)
    page = await history(client, session_id, f"?limit={limit}")
    assert (seqs(page), page["more"]) == ([1, 2, 3], False)


async def test_a_page_holds_a_hundred_events_unless_asked_for_more(client: AppClient) -> None:
    session_id = new_session_id()
    for n in range(1, 131):
        await publish(client, session_id, progress(n))
    page = await history(client, session_id)
    assert (seqs(page), page["more"]) == (list(range(1, 101)), True)
    page = await history(client, session_id, "?limit=200")
    assert (seqs(page), page["more"]) == (list(range(1, 131)), False)


async def test_a_page_holds_about_a_mebibyte_of_events_and_at_least_one(
    client: AppClient,
) -> None:
    """Large events: a page stops before its JSON passes 1 MiB (one event at least), so
    that a request never holds a whole buffer of them; the next page goes on from there."""
    session_id = new_session_id()
    big = {**progress(1), "data": {"blob": "x" * 60_000}}
    for _ in range(20):
        await publish(client, session_id, big)
    first = await history(client, session_id, "?limit=200")
    assert len(json.dumps(first)) <= 2**20 + 1000 and first["more"]
    rest = await history(client, session_id, f"?limit=200&after={first['events'][-1]['id']}")
    assert seqs(first) + seqs(rest) == list(range(1, 21)) and not rest["more"]


async def test_trimmed_events_are_a_gap_and_the_page_holds_at_most_the_buffer(
    make_server: ServerFactory, settings: Settings, aiohttp_client: Any
) -> None:
    client: AppClient = await aiohttp_client(await make_server(settings.replace(buffer_size=3)))
    session_id = new_session_id()
    answers = await publish_story(client, session_id, 5)
    page = await history(client, session_id, f"?after={answers[0]['id']}&limit=100")
    assert (seqs(page), page["gap"], page["more"]) == ([4, 5, 6], True, False)


async def test_an_unknown_session_is_404(client: AppClient) -> None:
    response = await client.get(f"/api/sessions/{new_session_id()}/events")
    assert response.status == 404
    assert (await response.json())["code"] == "session_not_found"


@pytest.mark.parametrize("limit", ["0", "000", "-1", "abc", "1.5", "\u0663", "", " 1"])
async def test_a_limit_that_is_not_a_whole_number_from_one_is_400(
    client: AppClient, limit: str
) -> None:
    session_id = new_session_id()
    await publish(client, session_id, final())
    response = await client.get(f"/api/sessions/{session_id}/events", params={"limit": limit})
    assert response.status == 400
    answer: Event = await response.json()
    assert answer["code"] == "invalid_request" and "'limit'" in answer["error"]
