"""The WebSocket transport over real sockets (PROTOCOL.md "WebSocket"), each test run with
two independent client libraries: aiohttp's client and ``websockets``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import socket
import struct
from collections.abc import Callable

import pytest
from aiohttp import ClientSession, WSServerHandshakeError
from websockets.exceptions import InvalidStatus

from server.config import Settings
from tests.clients import (
    BAD_SESSION_IDS,
    JUNK_EVENT_IDS,
    AppClient,
    Event,
    final,
    http_url,
    is_control_error,
    new_session_id,
    open_aiohttp_ws,
    open_slow_ws,
    open_websockets_ws,
    progress,
    publish,
    publish_until_slow_consumer_is_cut,
    read_events,
    read_to_end,
    seqs,
    stored,
    wait_until,
    ws_url,
)
from tests.conftest import ClientFactory, hub_of
from tests.timing import HEARTBEAT_INTERVAL, QUIET_HEARTBEAT_INTERVAL
from tests.transports.conftest import (
    SERVER_CODE,
    WSOpener,
    aiohttp_holds_no_more,
    live_tasks,
    subscribed,
    ws_path,
)

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

NORMAL_CLOSURE, GOING_AWAY, POLICY_VIOLATION, MESSAGE_TOO_BIG, TRY_AGAIN_LATER = (
    1000,
    1001,
    1008,
    1009,
    1013,
)


async def assert_still_streams(client: AppClient, open_ws: WSOpener) -> None:
    """A normal subscriber on a fresh session gets a published event, then the final one."""
    session_id = new_session_id()
    async with open_ws(client.server, ws_path(session_id)) as ws:
        await publish(client, session_id, progress(1))
        await publish(client, session_id, final())
        events = await read_to_end(ws)
        assert seqs(events) == [1, 2]
        assert ws.close_code == NORMAL_CLOSURE


# --- framing and delivery ---------------------------------------------------------------------


async def test_each_event_is_one_text_frame_with_id_seq_and_timestamp(
    client: AppClient, open_ws: WSOpener
) -> None:
    """Each published event arrives as one JSON text frame: its fields plus the session id,
    an RFC 3339 UTC timestamp, and the id and seq the publisher was given."""
    session_id = new_session_id()
    bodies: list[Event] = [
        progress(5, agent="orchestrator"),
        {
            "type": "agent_status",
            "agent": "demand",
            "status": "Loading",
            "progress": 2,
            "data": {"weeks": 156},
        },
        {
            "type": "error",
            "code": "agent_failed",
            "error": "The demand agent failed.",
            "details": "Reference abc",
            "agent": "demand",
            "final": False,
        },
        final({"units": 42}),
    ]
    async with open_ws(client.server, ws_path(session_id)) as ws:
        answers = [await publish(client, session_id, body) for body in bodies]
        events = await read_events(ws, len(bodies))
    for body, answer, event in zip(bodies, answers, events, strict=True):
        assert {key: event[key] for key in body} == body
        assert (event["id"], event["seq"]) == (answer["id"], answer["seq"])
        assert event["session_id"] == session_id
        assert RFC3339_UTC.match(event["timestamp"]), event["timestamp"]
    assert [event["seq"] for event in events] == [1, 2, 3, 4]


async def test_client_may_connect_before_anything_is_published(
    client: AppClient, open_ws: WSOpener
) -> None:
    """A subscriber to a session with no events yet waits, then gets each event live."""
    session_id = new_session_id()
    async with open_ws(client.server, ws_path(session_id)) as ws:
        await subscribed(client)
        for n in (1, 2):
            answer = await publish(client, session_id, progress(n))
            [event] = await read_events(ws, 1)
            assert event["id"] == answer["id"]


async def test_late_subscriber_gets_retained_events_then_live_ones(
    client: AppClient, open_ws: WSOpener
) -> None:
    """A client that connects mid-stream first gets every retained event, then live ones."""
    session_id = new_session_id()
    for n in (1, 2, 3):
        await publish(client, session_id, progress(n))
    async with open_ws(client.server, ws_path(session_id)) as ws:
        assert seqs(await read_events(ws, 3)) == [1, 2, 3]
        await publish(client, session_id, progress(4))
        assert seqs(await read_events(ws, 1)) == [4]


async def test_final_event_is_followed_by_close_1000(client: AppClient, open_ws: WSOpener) -> None:
    """After the final event the server closes with 1000 (do not reconnect)."""
    session_id = new_session_id()
    async with open_ws(client.server, ws_path(session_id)) as ws:
        await publish(client, session_id, progress(1))
        await publish(client, session_id, final())
        events = await read_to_end(ws)
        assert seqs(events) == [1, 2]
        assert events[-1]["final"] is True
        assert ws.close_code == NORMAL_CLOSURE


async def test_subscriber_after_the_end_gets_the_whole_story_then_1000(
    client: AppClient, open_ws: WSOpener
) -> None:
    """A client connecting after the session ended still sees every event, then 1000."""
    session_id = new_session_id()
    for n in (1, 2):
        await publish(client, session_id, progress(n))
    await publish(client, session_id, final())
    async with open_ws(client.server, ws_path(session_id)) as ws:
        assert seqs(await read_to_end(ws)) == [1, 2, 3]
        assert ws.close_code == NORMAL_CLOSURE


# --- resume and gaps --------------------------------------------------------------------------


async def test_resume_with_last_event_id_gets_exactly_the_events_after_it(
    client: AppClient, open_ws: WSOpener
) -> None:
    """Reconnecting with ``?last_event_id=`` gets exactly the events after that id: none
    lost (published while away) and none repeated."""
    session_id = new_session_id()
    async with open_ws(client.server, ws_path(session_id)) as ws:
        for n in (1, 2, 3):
            await publish(client, session_id, progress(n))
        seen = await read_events(ws, 2)
    for n in (4, 5):
        await publish(client, session_id, progress(n))
    async with open_ws(client.server, ws_path(session_id, seen[-1]["id"])) as ws:
        await publish(client, session_id, final())
        rest = await read_to_end(ws)
    assert seqs(rest) == [3, 4, 5, 6]
    assert not any(event["type"] == "error" for event in rest)


async def test_a_resume_id_with_blanks_around_it_is_that_id_as_over_sse(
    client: AppClient, open_ws: WSOpener
) -> None:
    """``?last_event_id=`` with blanks around the id (a client that built the URL
    carelessly) resumes at that id, as the same value does over SSE: no ``replay_gap``,
    nothing repeated. A blank value is no resume point: the whole story."""
    session_id = new_session_id()
    answers = [await publish(client, session_id, progress(n)) for n in (1, 2, 3)]
    await publish(client, session_id, final())
    for given, expected in ((f" {answers[1]['id']}\t", [3, 4]), (" ", [1, 2, 3, 4])):
        async with open_ws(client.server, ws_path(session_id, given)) as ws:
            assert seqs(events := await read_to_end(ws)) == expected
            assert not any(event["type"] == "error" for event in events)


async def test_resume_at_the_final_event_just_closes_1000(
    client: AppClient, open_ws: WSOpener
) -> None:
    """A client resuming from the final event's id gets nothing more, and a 1000 close."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    last = await publish(client, session_id, final())
    async with open_ws(client.server, ws_path(session_id, last["id"])) as ws:
        assert await read_to_end(ws) == []
        assert ws.close_code == NORMAL_CLOSURE


UNSERVABLE: dict[str, Callable[[str, int], str]] = {
    "malformed": lambda epoch, last: "not-an-event-id",
    "trimmed from the buffer": lambda epoch, last: f"{epoch}-1",
    "from an earlier life of the stream": lambda epoch, last: f"0ldepoch-{last - 1}",
    "ahead of the stream": lambda epoch, last: f"{epoch}-{last + 5}",
}


@pytest.mark.parametrize("case", list(UNSERVABLE))
async def test_unservable_resume_point_gets_replay_gap_then_every_retained_event(
    make_client: ClientFactory, settings: Settings, open_ws: WSOpener, case: str
) -> None:
    """A resume id that cannot be served gets a ``replay_gap`` control error (no id), then
    every retained event, then live ones: never a silent skip forward."""
    client = await make_client(settings.replace(buffer_size=5))
    session_id = new_session_id()
    answers = [await publish(client, session_id, progress(n)) for n in range(1, 9)]
    epoch = answers[-1]["id"].rpartition("-")[0]
    resume = UNSERVABLE[case](epoch, len(answers))
    async with open_ws(client.server, ws_path(session_id, resume)) as ws:
        first, *retained = await read_events(ws, 6)
        assert is_control_error(first, "replay_gap"), first
        assert seqs(retained) == [4, 5, 6, 7, 8]
        await publish(client, session_id, progress(9))
        assert seqs(await read_events(ws, 1)) == [9]


JUNK_IDS = {**JUNK_EVENT_IDS, "a NUL": "abcd1234\x00-1"}  # a query may carry a NUL


@pytest.mark.parametrize("case", list(JUNK_IDS))
async def test_junk_last_event_id_gets_replay_gap_then_the_whole_story(
    client: AppClient, open_ws: WSOpener, case: str
) -> None:
    """A junk ``?last_event_id=`` gets ``replay_gap``, then every retained event, then live
    ones; nothing else breaks."""
    session_id = new_session_id()
    for n in (1, 2):
        await publish(client, session_id, progress(n))
    async with open_ws(client.server, ws_path(session_id, JUNK_IDS[case])) as ws:
        gap, *story = await read_events(ws, 3)
        assert is_control_error(gap, "replay_gap"), gap
        assert seqs(story) == [1, 2]
        await publish(client, session_id, final())
        assert seqs(await read_to_end(ws)) == [3]
    await assert_still_streams(client, open_ws)


async def test_empty_last_event_id_means_from_the_start(
    client: AppClient, open_ws: WSOpener
) -> None:
    """An empty ``?last_event_id=`` is no resume point: the whole story, no ``replay_gap``."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    await publish(client, session_id, final())
    async with open_ws(client.server, ws_path(session_id, "")) as ws:
        events = await read_to_end(ws)
    assert events == stored(events) and seqs(events) == [1, 2]


async def test_an_idle_connection_holds_no_task_of_its_own(
    client: AppClient, open_ws: WSOpener
) -> None:
    """Once its replay is out, a connection that keeps up is written to by the hub itself:
    no sending task waits for it (an idle connection costs less memory), and what is
    published next still reaches every subscriber, in order."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    before = live_tasks(SERVER_CODE)
    async with contextlib.AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(open_ws(client.server, ws_path(session_id)))
            for _ in range(10)
        ]
        for ws in sockets:
            assert seqs(await read_events(ws, 1)) == [1]  # the replay, sent by a task
        await wait_until(
            lambda: live_tasks(SERVER_CODE) == before, "no task left for the connections"
        )
        await publish(client, session_id, progress(2))
        pinging = sockets[0]
        await pinging.send_text(json.dumps({"type": "ping"}))  # its answer goes via a task
        answered = await read_events(pinging, 2)
        assert [e.get("seq", e["type"]) for e in answered] == [2, "heartbeat"]
        await publish(client, session_id, progress(3))
        assert seqs(await read_events(pinging, 1)) == [3]
        for ws in sockets[1:]:
            assert seqs(await read_events(ws, 2)) == [2, 3]
        await wait_until(
            lambda: live_tasks(SERVER_CODE) == before, "no task left for the connections"
        )


async def test_an_idle_connection_is_no_longer_aiohttps(
    client: AppClient, open_ws: WSOpener
) -> None:
    """Once the 101 is out, a connection's socket belongs to the server's own protocol:
    aiohttp counts no connection for it and keeps no task (nor the request, the parser, the
    response and the reader they hold), most of an idle connection's memory
    (docs/BENCHMARKS.md). Live events still arrive, and the final event is still followed
    by a clean close 1000."""
    session_id = new_session_id()
    await publish(client, session_id, progress(1))
    aiohttp_holds_none = aiohttp_holds_no_more(client)

    async with contextlib.AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(open_ws(client.server, ws_path(session_id)))
            for _ in range(5)
        ]
        for ws in sockets:
            assert seqs(await read_events(ws, 1)) == [1]
        await wait_until(aiohttp_holds_none, "aiohttp holds nothing for the connections")
        await publish(client, session_id, progress(2))
        await publish(client, session_id, final())
        for ws in sockets:
            assert seqs(await read_to_end(ws)) == [2, 3]
            assert ws.close_code == NORMAL_CLOSURE
    await subscribed(client, 0)


# --- heartbeats and commands ------------------------------------------------------------------


def is_heartbeat(event: Event | None, session_id: str) -> bool:
    return (
        event is not None
        and event["type"] == "heartbeat"
        and event["message"] == "ping"
        and event["session_id"] == session_id
        and RFC3339_UTC.match(event["timestamp"]) is not None
        and "id" not in event
        and "seq" not in event
    )


async def test_idle_connection_gets_heartbeat_events_without_id(
    make_client: ClientFactory, settings: Settings, open_ws: WSOpener
) -> None:
    """An idle stream gets a ``heartbeat`` event every heartbeat_interval; heartbeats carry
    no id or seq, and the stream still delivers events between them."""
    client = await make_client(settings.replace(heartbeat_interval=HEARTBEAT_INTERVAL))
    session_id = new_session_id()
    async with open_ws(client.server, ws_path(session_id)) as ws:
        beats = await read_events(ws, 2)
        assert all(is_heartbeat(event, session_id) for event in beats), beats
        answer = await publish(client, session_id, progress(1))
        events: list[Event] = []
        while not stored(events):
            events += await read_events(ws, 1)
        assert stored(events)[0]["id"] == answer["id"]


async def test_client_ping_is_answered_with_a_heartbeat_at_once(
    make_client: ClientFactory, settings: Settings, open_ws: WSOpener
) -> None:
    """``{"type": "ping"}`` from the client is answered with a heartbeat event (the server's
    own idle heartbeat is an hour away here, so this one can only be the answer)."""
    client = await make_client(settings.replace(heartbeat_interval=QUIET_HEARTBEAT_INTERVAL))
    session_id = new_session_id()
    async with open_ws(client.server, ws_path(session_id)) as ws:
        for _ in range(2):
            await ws.send_text(json.dumps({"type": "ping"}))
            [answer] = await read_events(ws, 1)
            assert is_heartbeat(answer, session_id), answer


INVALID_FRAMES: dict[str, str | bytes] = {
    "text that is not JSON": "hello",
    "JSON that is not an object": "[1, 2, 3]",
    "a JSON string": '"ping"',
    "an unknown command": '{"type": "subscribe", "session_id": "x"}',
    "an object without a type": '{"ping": true}',
    "a truncated command": '{"type": "pi',
    "an empty frame": "",
    "a binary frame": b"\x00\x01\x02\xff",
    "a ping sent as binary": b'{"type": "ping"}',
    # Deeper than the JSON parser's recursion limit (RecursionError, not ValueError).
    "JSON nested 2,000 deep": "[" * 2000,
    "an object nested 1,000 deep": '{"":' * 1000,
}


@pytest.mark.parametrize("frame", list(INVALID_FRAMES))
async def test_invalid_frame_gets_invalid_message_and_the_stream_goes_on(
    client: AppClient, open_ws: WSOpener, frame: str
) -> None:
    """A frame that is not a known JSON command gets an ``invalid_message`` control error;
    the connection stays open, keeps streaming and still answers pings."""
    session_id = new_session_id()
    data = INVALID_FRAMES[frame]
    async with open_ws(client.server, ws_path(session_id)) as ws:
        await publish(client, session_id, progress(1))
        assert seqs(await read_events(ws, 1)) == [1]
        await (ws.send_bytes(data) if isinstance(data, bytes) else ws.send_text(data))
        [notice] = await read_events(ws, 1)
        assert is_control_error(notice, "invalid_message"), notice
        assert notice["final"] is False
        await publish(client, session_id, progress(2))
        assert seqs(await read_events(ws, 1)) == [2]
        await ws.send_text('{"type": "ping"}')
        [answer] = await read_events(ws, 1)
        assert answer["type"] == "heartbeat"


async def test_frame_of_exactly_max_frame_size_is_still_accepted(
    client: AppClient, settings: Settings, open_ws: WSOpener
) -> None:
    """A frame of exactly ``max_frame_size`` bytes is read (and, not being a command,
    answered with ``invalid_message``); the connection stays open."""
    async with open_ws(client.server, ws_path(new_session_id())) as ws:
        await ws.send_text(secrets.token_hex(settings.max_frame_size // 2))
        [notice] = await read_events(ws, 1)
        assert is_control_error(notice, "invalid_message"), notice


async def test_frame_over_max_frame_size_closes_1009(
    client: AppClient, settings: Settings, open_ws: WSOpener
) -> None:
    """A frame larger than ``max_frame_size`` closes the connection with 1009; other
    connections are unaffected."""
    async with open_ws(client.server, ws_path(new_session_id())) as ws:
        await ws.send_text(secrets.token_hex(settings.max_frame_size // 2) + "x")
        assert await read_to_end(ws) == []
        assert ws.close_code == MESSAGE_TOO_BIG
    await assert_still_streams(client, open_ws)


# --- refused sessions -------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_SESSION_IDS))
async def test_bad_session_id_gets_one_invalid_session_id_error_then_1008(
    client: AppClient, open_ws: WSOpener, case: str
) -> None:
    """A session id that does not match the pattern: the handshake succeeds, one
    ``invalid_session_id`` control error follows, then close 1008 (do not reconnect)."""
    async with open_ws(client.server, ws_path(BAD_SESSION_IDS[case])) as ws:
        events = await read_to_end(ws)
        assert len(events) == 1 and is_control_error(events[0], "invalid_session_id"), events
        assert ws.close_code == POLICY_VIOLATION
    assert hub_of(client.server).subscriber_count == 0
    await assert_still_streams(client, open_ws)


async def test_a_refused_client_gone_before_its_answer_is_no_error_in_the_log(
    client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients refused (a bad session id) that reset their connection right after the
    handshake request: there is no one to answer, and nothing to log as an error; a
    scanner, or a reconnect storm meeting a limit, would fill the log with tracebacks."""
    assert client.server.runner is not None
    handlers = client.server.runner.server
    assert handlers is not None
    loop = asyncio.get_running_loop()
    for _ in range(5):
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (client.server.host, client.server.port))
            await loop.sock_sendall(
                sock,
                b"GET /ws/orchestrator/bad HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n",
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await wait_until(lambda: not handlers.connections, "the refused handshake to end")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert hub_of(client.server).subscriber_count == 0


async def test_session_id_with_a_slash_is_not_a_stream_at_all(client: AppClient) -> None:
    """``/ws/orchestrator/a/b`` is no stream URL: both client libraries see the handshake
    refused with 404."""
    path = "/ws/orchestrator/abcdefgh/ijklmnop"
    async with ClientSession() as session:
        with pytest.raises(WSServerHandshakeError) as refused:
            async with open_aiohttp_ws(session, ws_url(client.server, path)):
                pass
        assert refused.value.status == 404
    with pytest.raises(InvalidStatus) as rejected:
        async with open_websockets_ws(ws_url(client.server, path)):
            pass
    assert rejected.value.response.status_code == 404
    assert json.loads(rejected.value.response.body or b"{}")["code"] == "not_found"


# --- server-side closes -----------------------------------------------------------------------


async def test_server_shutdown_closes_1001_and_the_client_resumes(
    client: AppClient, open_ws: WSOpener
) -> None:
    """When the server goes away (every subscription closed for shutdown) clients get 1001;
    reconnecting with the last id then resumes without loss."""
    session_id = new_session_id()
    async with open_ws(client.server, ws_path(session_id)) as ws:
        await publish(client, session_id, progress(1))
        seen = await read_events(ws, 1)
        hub_of(client.server).close_all("shutdown")
        assert await read_to_end(ws) == []
        assert ws.close_code == GOING_AWAY
    await publish(client, session_id, progress(2))
    async with open_ws(client.server, ws_path(session_id, seen[-1]["id"])) as ws:
        await publish(client, session_id, final())
        assert seqs(await read_to_end(ws)) == [2, 3]
        assert ws.close_code == NORMAL_CLOSURE


@pytest.mark.parametrize("slow_library", ["aiohttp", "websockets"])
async def test_slow_consumer_is_dropped_without_delaying_another_subscriber(
    make_client: ClientFactory, settings: Settings, slow_library: str
) -> None:
    """A subscriber that stops reading (its TCP window fills, so the server's socket backs
    up) is closed once ``subscriber_queue_size`` events are queued for it, while a reading
    subscriber on the same session gets every event; reading again, the slow one gets what
    was in flight, then ``slow_consumer`` and 1013, and resuming from its last id it misses
    nothing."""
    client = await make_client(
        settings.replace(subscriber_queue_size=4, heartbeat_interval=QUIET_HEARTBEAT_INTERVAL)
    )
    server = client.server
    session_id = new_session_id()
    url = ws_url(server, ws_path(session_id))

    async with (
        open_aiohttp_ws(client.session, url) as fast,
        open_slow_ws(slow_library, url) as slow,
    ):
        await subscribed(client, 2)
        published, fast_events = await publish_until_slow_consumer_is_cut(server, session_id, fast)
        await publish(client, session_id, final())
        fast_events += await read_to_end(fast)
        assert seqs(fast_events) == list(range(1, published + 2))
        assert fast.close_code == NORMAL_CLOSURE

        slow_events = await read_to_end(slow)
        assert is_control_error(slow_events[-1], "slow_consumer"), slow_events[-1]
        assert slow.close_code == TRY_AGAIN_LATER
    assert seqs(slow_events) == list(range(1, len(stored(slow_events)) + 1))
    resume = ws_path(session_id, stored(slow_events)[-1]["id"])
    async with open_websockets_ws(ws_url(server, resume)) as ws:
        resumed = await read_to_end(ws)
    assert seqs(slow_events) + seqs(resumed) == list(range(1, published + 2))
    assert ws.close_code == NORMAL_CLOSURE


async def test_http_request_to_the_stream_url_is_not_a_websocket(client: AppClient) -> None:
    """A plain GET (no upgrade) on the WebSocket URL is refused, not left hanging."""
    response = await client.session.get(http_url(client.server, ws_path(new_session_id())))
    assert 400 <= response.status < 500
    response.release()
