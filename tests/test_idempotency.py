"""Publishing with an ``Idempotency-Key``: an event sent again with its key is stored
once, and its publisher gets the first answer, on both brokers, over real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import BaseTestServer
from multidict import CIMultiDict

from server.config import Settings
from tests.clients import (
    AiohttpWS,
    AppClient,
    Event,
    final,
    new_session_id,
    progress,
    publish,
)
from tests.conftest import BOTH_BROKERS, ServerFactory

pytestmark = BOTH_BROKERS


async def publish_with_key(
    client: AppClient, session_id: str, key: str, body: Event | str
) -> tuple[int, dict[str, Any], str | None]:
    """POST one event with ``Idempotency-Key: key``; ``body`` as an object, or raw JSON.
    Returns the status, the JSON answer and the ``Idempotent-Replayed`` header."""
    data = body if isinstance(body, str) else json.dumps(body)
    response = await client.post(
        f"/api/sessions/{session_id}/events",
        data=data,
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    answer = json.loads(await response.text())
    return response.status, answer, response.headers.get("Idempotent-Replayed")


async def last_seq(client: AppClient, session_id: str) -> int:
    response = await client.get(f"/api/sessions/{session_id}")
    assert response.status == 200
    snapshot = await response.json()
    seq: int = snapshot["last_seq"]
    return seq


def reordered(value: Any) -> Any:
    """``value`` with the fields of every object, at any depth, in reverse order."""
    if isinstance(value, dict):
        return {k: reordered(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    return value


async def test_an_event_sent_again_with_its_key_is_stored_and_delivered_once(
    client: AppClient,
) -> None:
    """The retry (its JSON laid out differently, the fields of every object in another
    order) gets the first answer, marked replayed; a subscriber gets the event once,
    then what was published next."""
    session_id = new_session_id()
    event = {**progress(1), "data": {"a": 1, "b": {"c": [1, {"d": 2, "e": 3}], "f": None}}}
    async with client.ws_connect(f"/ws/orchestrator/{session_id}") as ws:
        stream = AiohttpWS(ws)
        status, first, replayed = await publish_with_key(client, session_id, "k-1", event)
        assert (status, replayed) == (202, None)
        again = json.dumps(reordered(event), indent=2)
        assert json.loads(again) == event and again != json.dumps(event, indent=2)
        status, second, replayed = await publish_with_key(client, session_id, "k-1", again)
        assert (status, second, replayed) == (202, first, "true")
        marker = await publish(client, session_id, progress(2))

        received = [await stream.next_event(), await stream.next_event()]
        assert [e and e["id"] for e in received] == [first["id"], marker["id"]]
    assert (first["seq"], marker["seq"]) == (1, 2)
    assert await last_seq(client, session_id) == 2


async def test_a_key_sent_again_with_another_event_is_refused(client: AppClient) -> None:
    session_id = new_session_id()
    status, _, _ = await publish_with_key(client, session_id, "k-1", progress(1))
    assert status == 202
    status, answer, _ = await publish_with_key(client, session_id, "k-1", progress(2))
    assert status == 422 and answer["code"] == "idempotency_key_reused"
    assert "Idempotency-Key" in answer["error"]
    assert await last_seq(client, session_id) == 1


async def test_the_final_event_sent_again_gets_its_answer_not_409(client: AppClient) -> None:
    """A publisher unsure whether its final event was stored (its answer lost) can ask again
    and learn that it was; any other event after the final one still gets 409."""
    session_id = new_session_id()
    status, first, _ = await publish_with_key(client, session_id, "the-end", final())
    assert status == 202
    status, again, replayed = await publish_with_key(client, session_id, "the-end", final())
    assert (status, again, replayed) == (202, first, "true")
    status, answer, _ = await publish_with_key(client, session_id, "after-the-end", progress(1))
    assert status == 409 and answer["code"] == "session_ended"
    assert await last_seq(client, session_id) == 1


async def test_keys_belong_to_their_session(client: AppClient) -> None:
    one, other = new_session_id(), new_session_id()
    status, first, _ = await publish_with_key(client, one, "k-1", progress(1))
    assert status == 202
    status, second, replayed = await publish_with_key(client, other, "k-1", progress(1))
    assert (status, replayed) == (202, None) and second["id"] != first["id"]
    assert await last_seq(client, other) == 1


async def test_the_same_event_sent_many_times_at_once_is_stored_once(client: AppClient) -> None:
    session_id = new_session_id()
    answers = await asyncio.gather(
        *(publish_with_key(client, session_id, "k-1", progress(1)) for _ in range(20))
    )
    assert {(status, json.dumps(answer)) for status, answer, _ in answers} == {
        (202, json.dumps({"id": answers[0][1]["id"], "seq": 1}))
    }
    assert sum(replayed is None for _, _, replayed in answers) == 1
    assert await last_seq(client, session_id) == 1


@pytest.mark.parametrize(
    "keys",
    [[""], ["k" * 129], ["tab\tinside"], ["k-1", "k-2"]],
    ids=["empty", "too long", "a control character", "two of them"],
)
async def test_a_malformed_key_is_refused_and_nothing_stored(
    client: AppClient, keys: list[str]
) -> None:
    session_id = new_session_id()
    response = await client.post(
        f"/api/sessions/{session_id}/events",
        json=progress(1),
        headers=CIMultiDict(("Idempotency-Key", key) for key in keys),
    )
    assert response.status == 400
    answer = await response.json()
    assert answer["code"] == "invalid_idempotency_key" and "Idempotency-Key" in answer["error"]
    response = await client.get(f"/api/sessions/{session_id}")
    assert response.status == 404


async def test_a_session_remembers_its_last_buffer_size_keys(
    make_server: ServerFactory,
    settings: Settings,
    aiohttp_client: Any,
) -> None:
    """Keys are bounded like the events: the oldest is forgotten once ``buffer_size`` newer
    ones were stored, and an event sent again with it is then stored again."""
    server: BaseTestServer = await make_server(settings.replace(buffer_size=3))
    client: AppClient = await aiohttp_client(server)
    session_id = new_session_id()
    for n in range(1, 5):
        status, _, _ = await publish_with_key(client, session_id, f"k-{n}", progress(n))
        assert status == 202
    status, answer, replayed = await publish_with_key(client, session_id, "k-2", progress(2))
    assert (status, answer["seq"], replayed) == (202, 2, "true")
    status, answer, replayed = await publish_with_key(client, session_id, "k-1", progress(1))
    assert (status, answer["seq"], replayed) == (202, 5, None)
