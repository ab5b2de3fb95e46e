"""The Server-Sent Events transport over real sockets (PROTOCOL.md "Server-Sent Events"),
each test run with a raw parse of the stream read by aiohttp and with ``curl -N``."""

from __future__ import annotations

import contextlib
import json

import pytest

from server.config import Settings
from tests.clients import (
    BAD_SESSION_IDS,
    FRONTEND_ORIGIN,
    JUNK_EVENT_IDS,
    AppClient,
    Event,
    connections,
    final,
    http_url,
    is_control_error,
    new_session_id,
    open_aiohttp_sse,
    open_curl_sse,
    progress,
    publish,
    publish_until_slow_consumer_is_cut,
    read_events,
    read_to_end,
    seqs,
    slow_session,
    stored,
    wait_until,
)
from tests.conftest import ClientFactory, hub_of
from tests.timing import CLEANUP_TIMEOUT, HEARTBEAT_INTERVAL, QUIET_HEARTBEAT_INTERVAL
from tests.transports.conftest import (
    AIOHTTP_SSE_CODE,
    SERVER_CODE,
    SSEOpener,
    aiohttp_holds_no_more,
    live_tasks,
    sse_path,
    subscribed,
    ws_path,
)


async def assert_still_streams(client: AppClient) -> None:
    """A normal SSE subscriber on a fresh session gets a published event, then the final one."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    await publish(client, session_id, final())
    async with open_aiohttp_sse(
        client.session, http_url(client.server, sse_path(session_id))
    ) as sse:
        assert sse.status == 200
        assert seqs(await read_to_end(sse)) == [1, 2]


def assert_error_body(body: bytes, code: str) -> None:
    error = json.loads(body)
    assert set(error) == {"error", "code", "reference"}
    assert error["code"] == code


# --- the response -----------------------------------------------------------------------------


async def test_response_has_the_sse_headers_and_starts_with_retry(
    client: AppClient, settings: Settings, open_sse: SSEOpener
) -> None:
    """The response is ``text/event-stream``, not cached nor buffered by proxies, and its
    first message is a ``retry:`` line with the configured reconnection delay."""
    async with open_sse(client.server, sse_path(new_session_id())) as sse:
        assert sse.status == 200
        assert sse.headers["Content-Type"].split(";")[0].strip() == "text/event-stream"
        assert sse.headers["Cache-Control"] == "no-cache"
        assert sse.headers["X-Accel-Buffering"] == "no"
        first = await sse.next_message()
        assert first is not None and first.names == ("retry",)
        assert first.retry == settings.sse_retry_ms


async def test_stored_events_are_framed_as_id_event_and_one_data_line(
    client: AppClient, open_sse: SSEOpener
) -> None:
    """Each stored event is written as ``id: <id>``, ``event: <type>`` and one ``data:`` line
    holding the event's JSON, then a blank line."""
    session_id = new_session_id()
    bodies: list[Event] = [
        progress(1),
        {
            "type": "agent_status",
            "agent": "demand",
            "status": "Line one\nline two",
            "progress": 3,
            "data": {"text": "a\r\nb"},
        },
        final(),
    ]
    answers = [await publish(client, session_id, body) for body in bodies]
    async with open_sse(client.server, sse_path(session_id)) as sse:
        events = await read_to_end(sse)
    assert [event["id"] for event in events] == [answer["id"] for answer in answers]
    messages = [message for message in sse.messages if message.data is not None]
    for message, event, body in zip(messages, events, bodies, strict=True):
        assert message.names == ("id", "event", "data")
        assert (message.id, message.event) == (event["id"], event["type"])
        assert {key: event[key] for key in body} == body
        block = f"id: {event['id']}\nevent: {event['type']}\ndata: {message.data}\n\n"
        assert block.encode() in sse.raw


async def test_heartbeats_have_no_id_line(
    make_client: ClientFactory, settings: Settings, open_sse: SSEOpener
) -> None:
    """An idle stream gets ``heartbeat`` events every heartbeat_interval, written without an
    ``id:`` line so the browser's last event id never moves to one."""
    client = await make_client(settings.replace(heartbeat_interval=HEARTBEAT_INTERVAL))
    session_id = new_session_id()
    async with open_sse(client.server, sse_path(session_id)) as sse:
        beats = await read_events(sse, 2)
        assert [beat["type"] for beat in beats] == ["heartbeat", "heartbeat"]
        assert all(beat["session_id"] == session_id for beat in beats)
        heartbeat_messages = [m for m in sse.messages if m.event == "heartbeat"]
        assert len(heartbeat_messages) == 2
        assert all(m.names == ("event", "data") for m in heartbeat_messages)


async def test_an_idle_stream_holds_no_task(client: AppClient, open_sse: SSEOpener) -> None:
    """Once caught up, a stream is written to by the hub itself: no task is kept for it,
    neither one of ours nor aiohttp-sse's pinger (the hub's heartbeat events do its job),
    so an idle stream costs less memory; what is published next still arrives, in order,
    and the streams end cleanly when their clients leave."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    before = live_tasks(SERVER_CODE, AIOHTTP_SSE_CODE)

    def no_task_left() -> bool:
        return live_tasks(SERVER_CODE, AIOHTTP_SSE_CODE) == before

    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(open_sse(client.server, sse_path(session_id)))
            for _ in range(5)
        ]
        for sse in streams:
            assert seqs(await read_events(sse, 1)) == [1]  # the replay, sent by a task
        await wait_until(no_task_left, "no task left for the streams")
        await publish(client, session_id, progress(2))
        for sse in streams:
            assert seqs(await read_events(sse, 1)) == [2]
        await wait_until(no_task_left, "no task left for the streams")
    await subscribed(client, 0)
    await assert_still_streams(client)


async def test_an_idle_stream_is_no_longer_aiohttps(client: AppClient, open_sse: SSEOpener) -> None:
    """Once its headers are out, a stream's socket belongs to the server's own protocol:
    aiohttp counts no connection for it and keeps no task (nor the request, the parser and
    the response they hold), most of an idle stream's memory (docs/BENCHMARKS.md). Live
    events still arrive, the response still ends after the final event, and the server
    then closes the connection, as its ``Connection: close`` header said."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    aiohttp_holds_none = aiohttp_holds_no_more(client)

    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(open_sse(client.server, sse_path(session_id)))
            for _ in range(5)
        ]
        for sse in streams:
            assert sse.headers["Connection"] == "close"
            assert seqs(await read_events(sse, 1)) == [1]
        await wait_until(aiohttp_holds_none, "aiohttp holds nothing for the streams")
        await publish(client, session_id, progress(2))
        await publish(client, session_id, final())
        for sse in streams:
            assert seqs(await read_to_end(sse)) == [2, 3]
            if hasattr(sse, "exit_code"):
                assert await sse.exit_code() == 0
    await subscribed(client, 0)


async def test_client_may_connect_before_anything_is_published(
    client: AppClient, open_sse: SSEOpener
) -> None:
    """A subscriber to a session with no events yet waits, and sees each event as it is
    published (``curl -N`` shows the stream as it happens, not at the end)."""
    session_id = new_session_id()
    async with open_sse(client.server, sse_path(session_id)) as sse:
        await subscribed(client)
        for n in (1, 2):
            answer = await publish(client, session_id, progress(n))
            [event] = await read_events(sse, 1)
            assert event["id"] == answer["id"]


async def test_response_ends_after_the_final_event(client: AppClient, open_sse: SSEOpener) -> None:
    """After the final event the server ends the response (curl exits with status 0)."""
    session_id = new_session_id()
    async with open_sse(client.server, sse_path(session_id)) as sse:
        await subscribed(client)
        await publish(client, session_id, progress(1))
        await publish(client, session_id, final())
        events = await read_to_end(sse)
        assert seqs(events) == [1, 2] and events[-1]["final"] is True
        if hasattr(sse, "exit_code"):
            assert await sse.exit_code() == 0


async def test_http_1_0_client_gets_the_same_stream(client: AppClient) -> None:
    """A client speaking HTTP/1.0 (no chunked encoding) gets the same stream, replayed and
    live events alike, with no chunk framing in it, ended by the server closing the
    connection after the final event. (nginx speaks HTTP/1.0 to its upstreams unless told
    otherwise.)"""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    url = http_url(client.server, sse_path(session_id))
    async with open_curl_sse(url, extra_args=("--http1.0",)) as sse:
        assert sse.status == 200
        assert "Transfer-Encoding" not in sse.headers
        await read_events(sse, 1)
        await publish(client, session_id, progress(2))  # written live, to a caught-up stream
        await publish(client, session_id, final())
        assert seqs(await read_to_end(sse)) == [2, 3]
        assert await sse.exit_code() == 0
    assert [m.names for m in sse.messages] == [("retry",)] + [("id", "event", "data")] * 3


# --- resume -----------------------------------------------------------------------------------


async def published_story(client: AppClient, session_id: str, count: int) -> list[Event]:
    return [await publish(client, session_id, progress(n)) for n in range(1, count + 1)]


async def test_resume_with_the_last_event_id_header(client: AppClient, open_sse: SSEOpener) -> None:
    """A reconnect with ``Last-Event-ID`` (what EventSource sends) gets exactly the events
    after that id."""
    session_id = new_session_id()
    answers = await published_story(client, session_id, 4)
    headers = {"Last-Event-ID": answers[1]["id"]}
    async with open_sse(client.server, sse_path(session_id), headers) as sse:
        await publish(client, session_id, final())
        assert seqs(await read_to_end(sse)) == [3, 4, 5]


async def test_resume_with_the_last_event_id_query_parameter(
    client: AppClient, open_sse: SSEOpener
) -> None:
    """A first connection that cannot set headers resumes with ``?last_event_id=``."""
    session_id = new_session_id()
    answers = await published_story(client, session_id, 4)
    async with open_sse(client.server, sse_path(session_id, answers[2]["id"])) as sse:
        await publish(client, session_id, final())
        assert seqs(await read_to_end(sse)) == [4, 5]


async def test_header_wins_over_the_query_parameter(client: AppClient, open_sse: SSEOpener) -> None:
    """With both, the ``Last-Event-ID`` header is the resume point (the browser moved on
    since the page built the URL)."""
    session_id = new_session_id()
    answers = await published_story(client, session_id, 4)
    path = sse_path(session_id, answers[0]["id"])
    async with open_sse(client.server, path, {"Last-Event-ID": answers[2]["id"]}) as sse:
        await publish(client, session_id, final())
        assert seqs(await read_to_end(sse)) == [4, 5]


# The page's ?last_event_id= and the polyfill's own parameter, as indexes of the published
# answers (a string: the value itself); either way the resume point is the third event.
POLYFILL_CASES = {
    "newer than the page's": (0, 2),
    "empty": (2, ""),
    "blank": (2, "%20"),
    "blanks": (2, "%09%20"),
}


@pytest.mark.parametrize("case", list(POLYFILL_CASES))
@pytest.mark.parametrize("name", ["lastEventId", "lastEventID"])
async def test_an_eventsource_polyfills_resume_parameter_wins_over_the_pages(
    client: AppClient, open_sse: SSEOpener, name: str, case: str
) -> None:
    """EventSource polyfills that send no headers resume by adding a parameter of their
    own to the page's URL (Yaffle's ``lastEventId``, Mercure's ``lastEventID``): it is
    newer than the URL's ``last_event_id``, so it is the resume point. An empty or blank
    one is no resume point, in the query as in the header: the page's ``last_event_id``
    stands, and no event the client has is sent again."""
    page, polyfill = POLYFILL_CASES[case]
    session_id = new_session_id()
    answers = await published_story(client, session_id, 4)
    value = answers[polyfill]["id"] if isinstance(polyfill, int) else polyfill
    path = f"{sse_path(session_id, answers[page]['id'])}&{name}={value}"
    async with open_sse(client.server, path) as sse:
        await publish(client, session_id, final())
        assert seqs(await read_to_end(sse)) == [4, 5]


async def test_empty_last_event_id_means_from_the_start(client: AppClient) -> None:
    """An empty (or all-blank) ``Last-Event-ID`` or ``?last_event_id=`` is no resume point:
    the whole story, with no ``replay_gap``."""
    session_id = new_session_id()
    await published_story(client, session_id, 2)
    await publish(client, session_id, final())
    for path, headers in [
        (sse_path(session_id), {"Last-Event-ID": ""}),
        (sse_path(session_id), {"Last-Event-ID": "   "}),
        (sse_path(session_id, ""), {}),
    ]:
        async with open_aiohttp_sse(client.session, http_url(client.server, path), headers) as sse:
            events = await read_to_end(sse)
        assert events == stored(events) and seqs(events) == [1, 2, 3]


JUNK_IDS = JUNK_EVENT_IDS


@pytest.mark.parametrize("case", list(JUNK_IDS))
async def test_junk_last_event_id_gets_replay_gap_then_the_whole_story(
    client: AppClient, open_sse: SSEOpener, case: str
) -> None:
    """A malformed ``Last-Event-ID`` is a position that cannot be served: a ``replay_gap``
    control event (no ``id:`` line), then every retained event, and nothing else breaks."""
    session_id = new_session_id()
    await published_story(client, session_id, 2)
    async with open_sse(
        client.server, sse_path(session_id), {"Last-Event-ID": JUNK_IDS[case]}
    ) as sse:
        assert sse.status == 200
        gap, *story = await read_events(sse, 3)
        assert is_control_error(gap, "replay_gap"), gap
        assert [m.names for m in sse.messages if m.event == "error"] == [("event", "data")]
        assert seqs(story) == [1, 2]
        await publish(client, session_id, final())
        assert seqs(await read_to_end(sse)) == [3]
    await assert_still_streams(client)


async def test_last_event_id_beyond_the_header_limit_is_refused_with_400(
    client: AppClient,
) -> None:
    """A ``Last-Event-ID`` longer than the server's header limit (8 KiB) is refused with 400
    before any stream starts, and the server goes on serving."""
    url = http_url(client.server, sse_path(new_session_id()))
    async with client.session.get(url, headers={"Last-Event-ID": "1" * 10_000}) as response:
        assert response.status == 400
    assert hub_of(client.server).subscriber_count == 0
    await assert_still_streams(client)


async def test_unservable_resume_points_get_replay_gap_then_the_retained_events(
    make_client: ClientFactory, settings: Settings, open_sse: SSEOpener
) -> None:
    """Trimmed, other-epoch and ahead-of-stream ids each get ``replay_gap``, then every
    retained event."""
    client = await make_client(settings.replace(buffer_size=5))
    session_id = new_session_id()
    answers = await published_story(client, session_id, 8)
    epoch = answers[-1]["id"].rpartition("-")[0]
    for resume in (f"{epoch}-1", "0ldepoch-7", f"{epoch}-99"):
        async with open_sse(client.server, sse_path(session_id), {"Last-Event-ID": resume}) as sse:
            gap, *retained = await read_events(sse, 6)
            assert is_control_error(gap, "replay_gap"), (resume, gap)
            assert seqs(retained) == [4, 5, 6, 7, 8]


async def test_resume_at_the_final_event_gets_204(client: AppClient, open_sse: SSEOpener) -> None:
    """A reconnect whose resume point is the final event gets ``204 No Content`` (which makes
    EventSource stop), by header or by query parameter."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    last = await publish(client, session_id, final())
    for path, headers in [
        (sse_path(session_id), {"Last-Event-ID": last["id"]}),
        (sse_path(session_id, last["id"]), {}),
    ]:
        async with open_sse(client.server, path, headers) as sse:
            assert sse.status == 204
            assert await sse.read_body() == b""
    assert hub_of(client.server).subscriber_count == 0


# --- refusals and CORS ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_SESSION_IDS))
async def test_bad_session_id_gets_400_with_a_json_error(
    client: AppClient, open_sse: SSEOpener, case: str
) -> None:
    """A session id that does not match the pattern gets 400 with a JSON error body
    ``{error, code: invalid_session_id, reference}``; no stream is opened."""
    async with open_sse(client.server, sse_path(BAD_SESSION_IDS[case])) as sse:
        assert sse.status == 400
        assert sse.headers["Content-Type"].startswith("application/json")
        assert_error_body(await sse.read_body(), "invalid_session_id")
    assert hub_of(client.server).subscriber_count == 0
    await assert_still_streams(client)


async def test_frontend_origin_is_allowed_by_cors(client: AppClient, open_sse: SSEOpener) -> None:
    """A stream opened from the frontend's origin carries ``Access-Control-Allow-Origin``."""
    async with open_sse(
        client.server, sse_path(new_session_id()), {"Origin": FRONTEND_ORIGIN}
    ) as sse:
        assert sse.status == 200
        assert sse.headers["Access-Control-Allow-Origin"] == FRONTEND_ORIGIN


async def test_foreign_origin_gets_no_cors_header(client: AppClient, open_sse: SSEOpener) -> None:
    """A stream opened from any other origin gets no ``Access-Control-Allow-Origin``, so a
    browser will not hand it to that page."""
    headers = {"Origin": "http://evil.example"}
    async with open_sse(client.server, sse_path(new_session_id()), headers) as sse:
        assert "Access-Control-Allow-Origin" not in sse.headers


async def test_cors_preflight_allows_last_event_id_from_the_frontend(client: AppClient) -> None:
    """A preflight from the frontend for a stream with ``Last-Event-ID`` is answered with
    that header allowed; a foreign origin's preflight is not."""
    path = sse_path(new_session_id())
    request_headers = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id",
    }
    async with client.options(path, headers={**request_headers, "Origin": FRONTEND_ORIGIN}) as ok:
        assert ok.status in (200, 204)
        assert ok.headers["Access-Control-Allow-Origin"] == FRONTEND_ORIGIN
        allowed = ok.headers["Access-Control-Allow-Headers"].lower()
        assert "last-event-id" in allowed
    foreign = {**request_headers, "Origin": "http://evil.example"}
    async with client.options(path, headers=foreign) as refused:
        assert "Access-Control-Allow-Origin" not in refused.headers


# --- server-side ends -------------------------------------------------------------------------


async def test_server_shutdown_ends_the_response_and_the_client_resumes(
    client: AppClient, open_sse: SSEOpener
) -> None:
    """When the server goes away, the response ends; reconnecting with the last id
    resumes without loss."""
    session_id = new_session_id()
    async with open_sse(client.server, sse_path(session_id)) as sse:
        answer = await publish(client, session_id, progress(1))
        await read_events(sse, 1)
        hub_of(client.server).close_all("shutdown")
        assert await read_to_end(sse) == []
    await publish(client, session_id, progress(2))
    async with open_sse(
        client.server, sse_path(session_id), {"Last-Event-ID": answer["id"]}
    ) as sse:
        await publish(client, session_id, final())
        assert seqs(await read_to_end(sse)) == [2, 3]


async def test_a_client_that_stops_reading_a_large_event_is_cut_off(
    make_client: ClientFactory, settings: Settings
) -> None:
    """Events larger than the socket's write buffer limit (64 KiB): a send that starts
    with nothing waiting fills the buffer past the limit by itself. A client that stops
    reading then must not hold its stream, its subscription and its connection slot for
    as long as it keeps the TCP connection open: within a heartbeat interval of waiting
    on it, it is cut off."""
    client = await make_client(
        settings.replace(max_body_size=1024 * 1024, heartbeat_interval=HEARTBEAT_INTERVAL)
    )
    session_id = new_session_id()
    for n in range(1, 21):
        await publish(client, session_id, {**progress(n), "data": {"pad": "x" * 500_000}})
    url = http_url(client.server, sse_path(session_id))
    # aiohttp's client stops reading its socket once its own buffer is full: the replay,
    # 10 MB, backs the server's socket up.
    async with slow_session() as session, session.get(url) as response:
        assert response.status == 200
        await wait_until(
            lambda: connections(client.server)["sse"] == 0,
            "the stream of a client that stopped reading to be cut off",
            CLEANUP_TIMEOUT,
        )
    assert hub_of(client.server).subscriber_count == 0


async def test_slow_consumer_is_ended_without_delaying_another_subscriber(
    make_client: ClientFactory, settings: Settings
) -> None:
    """A subscriber that stops reading is ended with a ``slow_consumer`` event once
    ``subscriber_queue_size`` events are queued for it, while a reading subscriber gets
    every event; resuming with ``Last-Event-ID`` the slow one misses nothing."""
    client = await make_client(
        settings.replace(subscriber_queue_size=4, heartbeat_interval=QUIET_HEARTBEAT_INTERVAL)
    )
    server = client.server
    session_id = new_session_id()
    url = http_url(server, sse_path(session_id))

    async with (
        open_aiohttp_sse(client.session, url) as fast,
        slow_session() as session,
        open_aiohttp_sse(session, url) as slow,
    ):
        await subscribed(client, 2)
        published, fast_events = await publish_until_slow_consumer_is_cut(server, session_id, fast)
        await publish(client, session_id, final())
        fast_events += await read_to_end(fast)
        assert seqs(fast_events) == list(range(1, published + 2))

        slow_events = await read_to_end(slow)
        assert is_control_error(slow_events[-1], "slow_consumer"), slow_events[-1]
    assert seqs(slow_events) == list(range(1, len(stored(slow_events)) + 1))
    headers = {"Last-Event-ID": stored(slow_events)[-1]["id"]}
    async with open_aiohttp_sse(client.session, url, headers) as sse:
        resumed = await read_to_end(sse)
    assert seqs(slow_events) + seqs(resumed) == list(range(1, published + 2))


@pytest.mark.parametrize("method", ["HEAD", "POST"])
async def test_a_method_other_than_get_is_405_before_anything_is_subscribed(
    client: AppClient, method: str
) -> None:
    """A stream's address (SSE, and WebSocket too) takes GET only: HEAD and POST get 405
    with ``Allow: GET``, and neither takes a connection's place nor joins the session (no
    replay is read), even for a session that has ended."""
    session_id = new_session_id()
    await publish(client, session_id, final())
    registry = hub_of(client.server)._metrics.registry
    replays = registry.get_sample_value("orchestrator_replays_total")
    for path in (
        sse_path(session_id),
        sse_path(session_id) + "?last_event_id=x",
        ws_path(session_id),
    ):
        async with client.request(method, path) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET"
    assert registry.get_sample_value("orchestrator_replays_total") == replays
