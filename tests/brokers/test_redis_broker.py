"""The Redis broker keeps the Broker promises across processes, and survives Redis faults.

Each broker instance has its own connections, so two instances stand for two
server processes. Everything runs against a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from server.brokers import redis as redis_broker_module
from server.brokers.base import IdempotencyKey, Repeated
from server.brokers.memory import MemoryBroker
from server.brokers.redis import RedisBroker
from server.errors import ServiceUnavailable, SessionEnded
from server.hub import Hub
from server.messages import CompleteEvent, ProgressEvent, StoredEvent, StreamPosition
from server.metrics import Metrics
from tests.redis_support import RedisServer

from .redis_support import (
    TIMEOUT,
    CountCalls,
    FreezingProxy,
    LoseFirstAnswer,
    Node,
    NodeFactory,
    ServerFactory,
    body,
    eventually,
    new_session_id,
    out_of_memory,
    redis_command,
    snapshot,
)


async def append_many(
    broker: RedisBroker | MemoryBroker, session_id: str, count: int, *, start: int = 1
) -> list[StoredEvent]:
    return [
        await broker.append(session_id, "progress", body(n), False)
        for n in range(start, start + count)
    ]


async def stream_bodies(redis: Redis, broker: RedisBroker, session_id: str) -> list[str]:
    """The JSON bodies of the session's stream entries, oldest first, as Redis holds them."""
    entries = await redis.xrange(broker._stream_key(session_id))
    return [str(fields["b"]) for _, fields in entries or () if fields is not None]


def keys_of(broker: RedisBroker, session_id: str) -> tuple[str, str]:
    """A session's state and events (its lease and its append nonces live shorter)."""
    return broker._state_key(session_id), broker._stream_key(session_id)


# --- storage -------------------------------------------------------------------------------


async def test_seq_is_gapless_when_processes_append_concurrently(make_node: NodeFactory) -> None:
    """Four processes appending 50 events each into one session get seq 1..200, once each."""
    nodes = [await make_node() for _ in range(4)]
    sid = new_session_id()

    async def publish(node_index: int) -> list[StoredEvent]:
        broker = nodes[node_index].broker
        return list(
            await asyncio.gather(
                *(
                    broker.append(sid, "progress", body(i, node=node_index), False)
                    for i in range(50)
                )
            )
        )

    results = [e for batch in await asyncio.gather(*map(publish, range(4))) for e in batch]
    assert sorted(e.seq for e in results) == list(range(1, 201))
    assert len({e.epoch for e in results}) == 1

    replay = await nodes[0].broker.read(sid, None)
    assert not replay.gap
    assert [e.seq for e in replay.events] == list(range(1, 201))
    by_seq = {e.seq: e.payload for e in results}
    assert all(e.payload == by_seq[e.seq] for e in replay.events)
    assert replay.info is not None and replay.info.last_seq == 200


async def test_buffer_is_trimmed_to_exactly_buffer_size(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Only the newest buffer_size events are retained; seq keeps counting."""
    node = await make_node(buffer_size=5)
    sid = new_session_id()
    await append_many(node.broker, sid, 12)
    replay = await node.broker.read(sid, None)
    assert [e.seq for e in replay.events] == [8, 9, 10, 11, 12]
    assert await raw_redis.xlen(node.broker._stream_key(sid)) == 5
    assert await node.broker.info(sid) == replay.info
    assert replay.info is not None and replay.info.last_seq == 12


async def test_events_round_trip_byte_for_byte(make_node: NodeFactory) -> None:
    """Type, final flag and body (with '|', non-ASCII, escapes) survive storage and delivery."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    await b.broker.watch(sid)
    text = body(1, status='a|b|c é ✓ "quoted" \\n', data={"k": [1, 2]})
    stored = await a.broker.append(sid, "complete", text, True)
    await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) == 1)
    (live,) = b.recorder.of(sid)
    (replayed,) = (await a.broker.read(sid, None)).events
    for event in (live, replayed):
        assert (event.id, event.type, event.final) == (stored.id, "complete", True)
        assert event.payload == stored.payload
        assert event.to_dict()["status"] == 'a|b|c é ✓ "quoted" \\n'
    assert stored.id is not None
    assert StreamPosition.parse(stored.id) == stored.position


# --- replay positions: the same rules as the in-memory broker -------------------------------

# A session with buffer_size 5 and events 1..8: 4..8 are retained.
REPLAY_CASES: dict[str, tuple[Callable[[str], StreamPosition | None], list[int], bool]] = {
    "from the start": (lambda epoch: None, [4, 5, 6, 7, 8], False),
    "after the newest": (lambda epoch: StreamPosition(epoch, 8), [], False),
    "after a retained event": (lambda epoch: StreamPosition(epoch, 6), [7, 8], False),
    "after the one before the oldest retained": (
        lambda epoch: StreamPosition(epoch, 3),
        [4, 5, 6, 7, 8],
        False,
    ),
    "after a trimmed event": (lambda epoch: StreamPosition(epoch, 2), [4, 5, 6, 7, 8], True),
    "from another epoch": (lambda epoch: StreamPosition("e0e0e0", 6), [4, 5, 6, 7, 8], True),
    "ahead of the stream": (lambda epoch: StreamPosition(epoch, 9), [4, 5, 6, 7, 8], True),
}


@pytest.mark.parametrize("limit", [None, 1, 2, 5, 6])
@pytest.mark.parametrize("case", list(REPLAY_CASES))
async def test_replay_from_each_position_matches_the_memory_broker(
    make_node: NodeFactory, case: str, limit: int | None
) -> None:
    """Every kind of resume position gives the same events and gap flag as memory.py,
    the oldest ``limit`` of them when asked for (read from Redis no more than that)."""
    position_of, expected, gap = REPLAY_CASES[case]
    node = await make_node(buffer_size=5)
    memory = MemoryBroker(buffer_size=5, session_ttl=120)
    sid = new_session_id()
    for broker in (node.broker, memory):
        events = await append_many(broker, sid, 8)
        replay = await broker.read(sid, position_of(events[0].epoch), limit)
        assert [e.seq for e in replay.events] == expected[:limit], type(broker).__name__
        assert replay.gap is gap, type(broker).__name__
        assert replay.info is not None and replay.info.last_seq == 8


@pytest.mark.parametrize("with_position", [False, True])
async def test_replay_of_a_missing_stream(make_node: NodeFactory, with_position: bool) -> None:
    """No stream: no events, no info; a gap only if a position was asked for."""
    node = await make_node()
    after = StreamPosition("abc123", 4) if with_position else None
    replay = await node.broker.read(new_session_id(), after)
    assert (replay.events, replay.gap, replay.info) == ([], with_position, None)


async def test_replay_after_the_final_event_is_empty_and_ended(make_node: NodeFactory) -> None:
    """Resuming exactly at the final event: nothing to send, and the session is ended."""
    node = await make_node()
    sid = new_session_id()
    await append_many(node.broker, sid, 2)
    final = await node.broker.append(sid, "complete", body(3), True)
    replay = await node.broker.read(sid, final.position)
    assert (replay.events, replay.gap) == ([], False)
    assert replay.info is not None
    assert (replay.info.ended, replay.info.final_id) == (True, final.id)


# --- ended sessions, claims ----------------------------------------------------------------


async def test_ended_session_refuses_appends_from_every_process(make_node: NodeFactory) -> None:
    """After the final event, appends from any process raise SessionEnded and store nothing."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    await append_many(a.broker, sid, 2)
    final = await a.broker.append(sid, "error", body(3), True)
    for node in (a, b):
        with pytest.raises(SessionEnded):
            await node.broker.append(sid, "progress", body(4), False)
    info = await b.broker.info(sid)
    assert info is not None
    assert (info.ended, info.final_id, info.last_seq) == (True, final.id, 3)
    assert [e.seq for e in (await b.broker.read(sid, None)).events] == [1, 2, 3]


async def test_claim_succeeds_once_across_processes(make_node: NodeFactory) -> None:
    """Of many concurrent claims from two processes exactly one wins; the claim is the stream."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    results = await asyncio.gather(*(n.broker.claim(sid) for n in (a, b, a, b, a, b)))
    assert sorted(results) == [False] * 5 + [True]
    info = await a.broker.info(sid)
    assert info is not None and (info.last_seq, info.ended) == (0, False)
    replay = await b.broker.read(sid, None)
    assert (replay.events, replay.gap, replay.info) == ([], False, info)
    first = await b.broker.append(sid, "progress", body(1), False)
    assert (first.epoch, first.seq) == (info.epoch, 1)


async def test_claim_fails_for_a_session_with_events(make_node: NodeFactory) -> None:
    """A session that already has events cannot be claimed."""
    node = await make_node()
    sid = new_session_id()
    await append_many(node.broker, sid, 1)
    assert await node.broker.claim(sid) is False


async def test_append_whose_answer_was_lost_is_stored_once(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, raw_redis: Redis
) -> None:
    """A retried append whose first attempt did reach Redis returns that event, not a copy."""
    node = await make_node()
    sid = new_session_id()
    lossy = LoseFirstAnswer(node.broker._run_appends)
    monkeypatch.setattr(node.broker, "_run_appends", lossy)
    first = await node.broker.append(sid, "progress", body(1), False)
    second = await node.broker.append(sid, "progress", body(2), False)
    assert lossy.calls == 3
    assert (first.seq, second.seq) == (1, 2)
    assert await raw_redis.xlen(node.broker._stream_key(sid)) == 2


async def test_an_append_retried_after_many_others_is_stored_once(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, raw_redis: Redis
) -> None:
    """Another process appends 100 events to the session between an append's first attempt
    (stored, its answer lost) and its retry: the retry still finds what it stored."""
    x, y = await make_node(), await make_node()
    sid = new_session_id()
    lossy = LoseFirstAnswer(
        x.broker._run_appends, meanwhile=lambda: append_many(y.broker, sid, 100, start=2)
    )
    monkeypatch.setattr(x.broker, "_run_appends", lossy)
    first = await x.broker.append(sid, "progress", body(1), False)
    assert lossy.calls == 2
    assert (first.seq, json.loads(first.payload)["n"]) == (1, 1)
    stored = await stream_bodies(raw_redis, x.broker, sid)
    assert [json.loads(b)["n"] for b in stored] == list(range(1, 102))


async def test_batches_whose_answers_were_all_lost_are_each_stored_once(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, raw_redis: Redis
) -> None:
    """200 appends at once into one session go out as several pipelines of at most 64, the
    first three answers lost, as when a connection drops with them all on their way: every
    retried append, whatever came after it, finds its own entry; nothing is stored twice."""
    node = await make_node()
    sid = new_session_id()
    lossy = LoseFirstAnswer(node.broker._run_appends, lost=3)
    monkeypatch.setattr(node.broker, "_run_appends", lossy)
    results = await asyncio.gather(
        *(node.broker.append(sid, "progress", body(n), False) for n in range(200))
    )
    assert lossy.calls >= 6  # three lost, then their retries
    assert [json.loads(e.payload)["n"] for e in results] == list(range(200))
    assert sorted(e.seq for e in results) == list(range(1, 201))
    stored = await stream_bodies(raw_redis, node.broker, sid)
    assert sorted(json.loads(b)["n"] for b in stored) == list(range(200))


KEY = IdempotencyKey("k-1", "fingerprint-1")


async def test_a_keyed_append_answered_503_then_sent_again_is_stored_once(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, raw_redis: Redis
) -> None:
    """What idempotency keys are for: Redis stores the event, every answer is lost until the
    retry budget is spent (the publisher gets 503), and the publisher sends it again with
    its key: it learns the first seq, and the event is stored once."""
    node = await make_node(op_timeout=0.2, retry_budget=0.3)
    sid = new_session_id()
    lossy = LoseFirstAnswer(node.broker._run_appends, lost=1_000_000)
    monkeypatch.setattr(node.broker, "_run_appends", lossy)
    with pytest.raises(ServiceUnavailable):
        await node.broker.append(sid, "progress", body(1), False, KEY)
    assert lossy.calls >= 2
    lossy.lost = 0
    with pytest.raises(Repeated) as repeated:
        await node.broker.append(sid, "progress", body(1), False, KEY)
    assert repeated.value.seq == 1
    assert await stream_bodies(raw_redis, node.broker, sid) == [body(1)]


async def test_a_sessions_keys_expire_with_it_and_a_new_life_starts_without_them(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """The keys list follows the state's expiry, refreshed by unkeyed appends too (its
    oldest keys must stay removable for as long as the state lives); once the session is
    forgotten, a key it had is a new event in the stream's new life."""
    node = await make_node(session_ttl=60)
    sid = new_session_id()
    first = await node.broker.append(sid, "progress", body(1), False, KEY)
    keys = node.broker._keys_key(sid)
    assert 1000 < await raw_redis.pttl(keys) <= 60_000
    await raw_redis.pexpire(keys, 1000)
    await append_many(node.broker, sid, 1, start=2)
    assert 1000 < await raw_redis.pttl(keys) <= 60_000

    await raw_redis.delete(*keys_of(node.broker, sid))  # as when the session expires
    again = await node.broker.append(sid, "progress", body(1), False, KEY)
    assert again.seq == 1 and again.epoch != first.epoch
    assert await raw_redis.lrange(keys, 0, -1) == [KEY.key]

    # A claim starts a new life too (run-workflow with an id used before, expired).
    await raw_redis.delete(*keys_of(node.broker, sid))
    assert await node.broker.claim(sid)
    assert await raw_redis.exists(keys) == 0


async def test_nonces_are_kept_only_for_the_retry_window(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """A session's nonces live as long as a retry may come (twice the retry budget and the
    time-out of an attempt: the window), at most two windows, then expire: an ended
    session holds only its state and events."""
    node = await make_node(op_timeout=0.2, retry_budget=0.3)  # a window of 1 s
    sid = new_session_id()
    await append_many(node.broker, sid, 3)
    seqs = node.broker._nonce_seqs_key(sid)
    noted = await raw_redis.hgetall(seqs)
    assert sorted(noted.values()) == ["1", "2", "3"]
    assert 1000 < await raw_redis.pttl(seqs) <= 2000

    async def expired() -> bool:
        return await raw_redis.exists(seqs, node.broker._earlier_nonce_seqs_key(sid)) == 0

    await eventually(expired)
    assert await raw_redis.exists(*keys_of(node.broker, sid)) == 2


async def test_a_retry_finds_its_first_attempt_for_a_window_then_its_nonce_is_gone(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """The nonces of a window's appends are kept in one hash, which is set aside once a
    window old, and dropped a window later: a retry within the window finds what its
    first attempt stored, even across that turn, and nothing is pruned note by note, so
    a burst of appends costs its memory for two windows at most."""
    node = await make_node(op_timeout=0.2, retry_budget=0.3)  # a window of 1 s
    sid = new_session_id()
    broker = node.broker
    first = broker._append_request(sid, "progress", body(1), False)
    nonce = first.settings[4]
    [stored] = await broker._live.call(broker._packed_appends([first], False))
    assert (stored[0], stored[2]) == (1, 1)
    await asyncio.sleep(1.1)  # the window passing is what is tested
    await append_many(broker, sid, 1, start=2)  # the hash holding seq 1's nonce is set aside
    [again] = await broker._live.call(broker._packed_appends([first], True))
    assert (again[0], again[2]) == (1, 1)  # found: nothing stored twice
    earlier = broker._earlier_nonce_seqs_key(sid)
    assert nonce in await raw_redis.hkeys(earlier)
    await asyncio.sleep(1.1)
    await append_many(broker, sid, 1, start=3)  # a window later, seq 1's nonce is gone
    assert nonce not in await raw_redis.hkeys(earlier)
    assert len(await raw_redis.hkeys(broker._nonce_seqs_key(sid))) == 1  # seq 3's


async def test_concurrent_appends_share_round_trips_and_are_stored_once(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """300 appends made at once, over 10 sessions, go out in a handful of pipelines; each is
    stored once, every session's seqs are gapless, and each caller gets its own event."""
    node = await make_node()
    sids = [new_session_id() for _ in range(10)]
    requests = [(sids[i % 10], body(i)) for i in range(300)]
    results = await asyncio.gather(
        *(node.broker.append(sid, "progress", text, False) for sid, text in requests)
    )
    assert node.broker._appends is not None and node.broker._appends.batches <= 10
    assert [(e.session_id, json.loads(e.payload)["n"]) for e in results] == [
        (sid, n) for n, (sid, _) in enumerate(requests)
    ]
    for sid in sids:
        assert sorted(e.seq for e in results if e.session_id == sid) == list(range(1, 31))
        assert await raw_redis.xlen(node.broker._stream_key(sid)) == 30


async def test_a_pipeline_whose_answer_was_lost_stores_each_append_once(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, raw_redis: Redis
) -> None:
    """The whole pipeline is retried, and each append finds what its first attempt stored."""
    node = await make_node()
    sid = new_session_id()
    await node.broker.append(sid, "progress", body(0), False)  # the lone one, before
    lossy = LoseFirstAnswer(node.broker._run_appends)
    monkeypatch.setattr(node.broker, "_run_appends", lossy)
    results = await asyncio.gather(
        *(node.broker.append(sid, "progress", body(n), False) for n in range(1, 101))
    )
    assert lossy.calls >= 3  # the lone first call, lost once, then the rest batched
    assert sorted(e.seq for e in results) == list(range(2, 102))
    assert await raw_redis.xlen(node.broker._stream_key(sid)) == 101


async def test_appends_go_on_after_redis_forgets_the_script(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """After ``SCRIPT FLUSH`` (as after a restart of Redis), lone and pipelined appends load
    the script again and store each event once."""
    node = await make_node()
    sid = new_session_id()
    await node.broker.append(sid, "progress", body(1), False)
    for _ in range(2):
        await raw_redis.script_flush()
        lone = await node.broker.append(sid, "progress", body(2), False)
        await raw_redis.script_flush()
        batched = await asyncio.gather(
            *(node.broker.append(sid, "progress", body(n), False) for n in range(10))
        )
    assert lone.seq == 13
    assert sorted(e.seq for e in batched) == list(range(14, 24))
    assert await raw_redis.xlen(node.broker._stream_key(sid)) == 23


async def test_overlapping_publishers_each_get_their_own_answer(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Publishers appending one event at a time, as the publish requests of many sessions do:
    with two of them, a lone append and a batch of one are on their way at once, and each
    caller still gets the answer to its own append, never its neighbour's."""
    node = await make_node()
    sids = [new_session_id() for _ in range(2)]

    async def publisher(sid: str) -> list[StoredEvent]:
        return await append_many(node.broker, sid, 30)

    results = await asyncio.gather(*(publisher(sid) for sid in sids))
    for sid, events in zip(sids, results, strict=True):
        assert [(e.session_id, e.seq, json.loads(e.payload)["n"]) for e in events] == [
            (sid, n, n) for n in range(1, 31)
        ]
        stored = await stream_bodies(raw_redis, node.broker, sid)
        assert [json.loads(b)["n"] for b in stored] == list(range(1, 31))


async def test_a_lone_append_that_timed_out_is_stored_once(
    make_node: NodeFactory, own_redis: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis holds an append past its time-out (``CLIENT PAUSE``): the call is abandoned and
    retried, the append is stored once, and the next append gets its own answer rather than
    the late answer of the abandoned call."""
    server = own_redis()
    node = await make_node(server.url, op_timeout=0.2, retry_budget=TIMEOUT)
    admin = Redis.from_url(server.url, decode_responses=True)
    sid = new_session_id()
    await node.broker.append(sid, "progress", body(1), False)
    attempts = CountCalls(node.broker._run_appends)
    monkeypatch.setattr(node.broker, "_run_appends", attempts)
    try:
        await redis_command(admin, "CLIENT", "PAUSE", int(TIMEOUT * 1000), "WRITE")
        append = asyncio.create_task(node.broker.append(sid, "progress", body(2), False))
        await eventually(lambda: attempts.calls >= 2)  # the first attempt timed out
        await redis_command(admin, "CLIENT", "UNPAUSE")
        second = await append
        third = await node.broker.append(sid, "progress", body(3), False)
        assert [(e.seq, json.loads(e.payload)["n"]) for e in (second, third)] == [(2, 2), (3, 3)]
        stored = await stream_bodies(admin, node.broker, sid)
        assert [json.loads(b)["n"] for b in stored] == [1, 2, 3]
    finally:
        await admin.aclose()


async def test_an_append_redis_refuses_fails_alone(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """In a batch, an append whose script Redis refuses (here: its state key was overwritten
    with a string) fails on its own; the others are stored, and the next append is answered
    in step."""
    node = await make_node()
    good, bad = new_session_id(), new_session_id()
    await raw_redis.set(node.broker._state_key(bad), "not a hash")
    batch = [
        node.broker._append_request(sid, "progress", body(n), False)
        for n, sid in enumerate([good, bad, good], start=1)
    ]
    first, refused, third = await node.broker._store_batch(batch)
    assert isinstance(refused, ServiceUnavailable)
    assert isinstance(first, StoredEvent) and isinstance(third, StoredEvent)
    assert (first.seq, third.seq) == (1, 2)
    after = await node.broker.append(good, "progress", body(4), False)
    assert (after.seq, json.loads(after.payload)["n"]) == (3, 4)
    assert await raw_redis.xlen(node.broker._stream_key(good)) == 3


def test_a_broker_needs_a_pooled_connection(redis_url: str) -> None:
    with pytest.raises(ValueError, match="max_connections"):
        RedisBroker(redis_url, 10, 60.0, max_connections=0)


async def test_appends_do_not_starve_other_calls_of_connections(make_node: NodeFactory) -> None:
    """Appends go on the live connection, not the pool: with a pool of one, replays and
    claims still get it while appends flow."""
    node = await make_node(max_connections=1)
    sid = new_session_id()
    appends = asyncio.gather(
        *(node.broker.append(sid, "progress", body(n), False) for n in range(50))
    )
    replays = asyncio.gather(*(node.broker.read(sid, None) for _ in range(10)))
    claims = asyncio.gather(*(node.broker.claim(new_session_id()) for _ in range(10)))
    stored, _, claimed = await asyncio.gather(appends, replays, claims)
    assert sorted(e.seq for e in stored) == list(range(1, 51))
    assert claimed == [True] * 10
    assert len((await node.broker.read(sid, None)).events) == 50


async def test_claim_whose_answer_was_lost_still_wins(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried claim recognises its own first attempt."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    monkeypatch.setattr(a.broker, "_claim_script", LoseFirstAnswer(a.broker._claim_script))
    assert await a.broker.claim(sid) is True
    assert await b.broker.claim(sid) is False


# --- expiry --------------------------------------------------------------------------------


async def test_session_expires_after_ttl_and_returns_with_a_new_epoch(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """session_ttl after the last append the session is forgotten; it comes back as a new epoch."""
    node = await make_node(session_ttl=0.3)
    sid = new_session_id()
    old = (await append_many(node.broker, sid, 3))[-1]
    for key in keys_of(node.broker, sid):
        assert 0 < await raw_redis.pttl(key) <= 300

    async def forgotten() -> bool:
        return await raw_redis.exists(*keys_of(node.broker, sid)) == 0

    await eventually(forgotten)
    assert await node.broker.info(sid) is None

    new = await node.broker.append(sid, "progress", body(1), False)
    assert new.seq == 1 and new.epoch != old.epoch
    replay = await node.broker.read(sid, old.position)
    assert replay.gap and [e.id for e in replay.events] == [new.id]


async def test_every_append_refreshes_the_expiry(make_node: NodeFactory, raw_redis: Redis) -> None:
    """An append pushes the expiry of the session's keys back to session_ttl."""
    node = await make_node(session_ttl=60)
    sid = new_session_id()
    await append_many(node.broker, sid, 1)
    for key in keys_of(node.broker, sid):
        await raw_redis.pexpire(key, 1000)
    await append_many(node.broker, sid, 1, start=2)
    for key in keys_of(node.broker, sid):
        assert 1000 < await raw_redis.pttl(key) <= 60_000


async def test_a_claim_expires_too(make_node: NodeFactory) -> None:
    """A claimed session with no event is forgotten after session_ttl, then claimable again."""
    node = await make_node(session_ttl=0.2)
    sid = new_session_id()
    assert await node.broker.claim(sid)

    async def gone() -> bool:
        return await node.broker.info(sid) is None

    await eventually(gone)
    assert await node.broker.claim(sid)


# --- live delivery -------------------------------------------------------------------------


async def test_live_events_reach_every_watching_process_in_one_order(
    make_node: NodeFactory,
) -> None:
    """Two publishers, two watchers: both watchers get seq 1..50 in order, once each."""
    a, b, c, d = [await make_node() for _ in range(4)]
    sid = new_session_id()
    await b.broker.watch(sid)
    await d.broker.watch(sid)

    async def publish(node_index: int, node: Node) -> None:
        for i in range(25):
            await node.broker.append(sid, "progress", body(i, node=node_index), False)

    async def all_arrive(node: Node) -> None:
        await node.recorder.wait_until(lambda: len(node.recorder.of(sid)) == 50)

    await asyncio.gather(publish(0, a), publish(1, c))
    await asyncio.gather(all_arrive(b), all_arrive(d))
    assert b.recorder.seqs(sid) == list(range(1, 51))
    assert [e.payload for e in b.recorder.of(sid)] == [e.payload for e in d.recorder.of(sid)]
    assert a.recorder.events == [] and c.recorder.events == []  # they watch nothing


async def test_unwatched_sessions_are_not_delivered(make_node: NodeFactory) -> None:
    """After unwatch, the session's events stop reaching this process."""
    a, b = await make_node(), await make_node()
    sid, other = new_session_id(), new_session_id()
    await b.broker.watch(sid)
    await append_many(a.broker, sid, 1)
    await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) == 1)
    await b.broker.unwatch(sid)
    await b.broker.watch(other)
    await append_many(a.broker, sid, 1, start=2)
    marker = await a.broker.append(other, "progress", body(1), False)
    # One connection delivers in publish order: once the later marker is here,
    # the earlier event would have been too.
    await b.recorder.wait_until(lambda: bool(b.recorder.of(other)))
    assert b.recorder.of(other)[0].id == marker.id
    assert b.recorder.seqs(sid) == [1]


async def test_nothing_is_lost_between_watch_and_replay(make_node: NodeFactory) -> None:
    """Watch, then read, while another process appends: replay + live cover every seq."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    total = 200
    started = asyncio.Event()

    async def publish() -> None:
        for n in range(1, total + 1):
            await a.broker.append(sid, "progress", body(n), n == total)
            if n == 20:
                started.set()

    publisher = asyncio.create_task(publish())
    async with asyncio.timeout(TIMEOUT):
        await started.wait()
    await b.broker.watch(sid)
    replay = await b.broker.read(sid, None)
    await publisher
    await b.recorder.wait_until(lambda: any(e.final for e in b.recorder.of(sid)))
    replayed = [e.seq for e in replay.events]
    live = [s for s in b.recorder.seqs(sid) if s > replayed[-1]]
    assert replayed == list(range(1, len(replayed) + 1))
    assert live == list(range(replayed[-1] + 1, total + 1))


async def test_missed_live_events_are_caught_up_after_a_pubsub_reconnect(
    make_node: NodeFactory, own_redis: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events stored while the pub/sub connection was down are delivered after it returns."""
    server = own_redis()
    a, b = await make_node(server.url), await make_node(server.url)
    sid = new_session_id()
    await b.broker.watch(sid)
    await append_many(a.broker, sid, 2)
    await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2])

    reconnecting, release = asyncio.Event(), asyncio.Event()
    connect = b.broker._live._connect

    async def held_back() -> Any:
        reconnecting.set()
        await release.wait()
        return await connect()

    monkeypatch.setattr(b.broker._live, "_connect", held_back)
    killer = Redis.from_url(server.url)
    try:
        await killer.client_kill_filter(_type="pubsub")
    finally:
        await killer.aclose()
    async with asyncio.timeout(TIMEOUT):
        await reconnecting.wait()
    await append_many(a.broker, sid, 3, start=3)  # while b hears nothing
    release.set()
    await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) >= 5)
    await append_many(a.broker, sid, 1, start=6)
    await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) >= 6)
    assert b.recorder.seqs(sid) == [1, 2, 3, 4, 5, 6]


async def test_a_silent_pubsub_connection_is_replaced_and_what_it_missed_is_delivered(
    make_node: NodeFactory, redis_url: str
) -> None:
    """The pub/sub connection stays open but carries nothing more (a half-open TCP
    connection, which no error announces): within two ``idle_ping``s the reader gives up on
    it, connects again, and delivers what was stored meanwhile."""
    proxy = await FreezingProxy.start(redis_url)
    try:
        a = await make_node()
        b = await make_node(proxy.url(redis_url), idle_ping=0.2)
        sid = new_session_id()
        await b.broker.watch(sid)
        await append_many(a.broker, sid, 1)
        await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1])
        await proxy.freeze()
        await append_many(a.broker, sid, 2, start=2)
        await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2, 3])
        await append_many(a.broker, sid, 1, start=4)
        await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2, 3, 4])
    finally:
        await proxy.close()


async def serves_every_path(make_node: NodeFactory, url: str, **options: Any) -> tuple[str, str]:
    """Through two brokers on ``url``: appends, live delivery, a replay and a lease check.
    Returns the keys of the session it used."""
    a, b = await make_node(url, **options), await make_node(url, **options)
    sid = new_session_id()
    await b.broker.watch(sid)
    stored = await append_many(a.broker, sid, 3)
    await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2, 3])
    replay = await b.broker.read(sid, None)
    assert [e.id for e in replay.events] == [e.id for e in stored]
    assert await a.broker.lease_states([sid]) == {sid: "none"}
    keyed = await a.broker.append(sid, "progress", body(4), False, KEY)
    with pytest.raises(Repeated):
        await b.broker.append(sid, "progress", body(4), False, KEY)
    await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2, 3, keyed.seq])
    return keys_of(a.broker, sid)


async def test_a_redis_with_a_password_and_another_database_serves_every_path(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """The append and pub/sub connections, which the broker reads itself, are opened by
    redis-py: the URL's password and database number apply to them as to every other call."""
    server = own_redis(password="pw-for-the-test")
    url = server.url.removesuffix("/0") + "/5"
    keys = await serves_every_path(make_node, url)
    for database_url, count in ((url, 2), (server.url, 0)):
        admin = Redis.from_url(database_url, decode_responses=True)
        try:
            assert await admin.exists(*keys) == count
        finally:
            await admin.aclose()


async def test_the_readmes_acl_user_is_enough_for_every_path(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """The README's least-privilege ACL user, taken from the README itself, with the
    default key prefix: every path works, the connections read directly included."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (rule_line,) = [line for line in readme.splitlines() if line.startswith("user orchestrator ")]
    rules = rule_line.split()[2:]
    assert ">PASSWORD" in rules
    server = own_redis()
    admin = Redis.from_url(server.url, decode_responses=True)
    try:
        rules = [">pw-for-the-acl" if rule == ">PASSWORD" else rule for rule in rules]
        await redis_command(admin, "ACL", "SETUSER", "orchestrator", "reset", *rules)
    finally:
        await admin.aclose()
    url = server.url.replace("redis://", "redis://orchestrator:pw-for-the-acl@")
    await serves_every_path(make_node, url, key_prefix="orch")


async def test_a_redis_over_tls_serves_every_path(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """A ``rediss://`` URL: the append and pub/sub connections, which the broker reads
    itself, are TLS connections opened by redis-py (the server's certificate checked
    against the URL's CA file), and appends, replays and live delivery work over them."""
    server = own_redis(tls=True)
    assert server.url.startswith("rediss://")
    await serves_every_path(make_node, server.url)


# --- faults --------------------------------------------------------------------------------


async def test_redis_restarted_empty_gives_a_new_epoch_and_a_gap(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """Redis comes back empty: publishing resumes in a new epoch, old ids get a gap, watchers
    hear the new epoch, and no process is restarted."""
    server = own_redis()
    a = await make_node(server.url, retry_budget=0.3)
    b = await make_node(server.url)
    sid = new_session_id()
    await b.broker.watch(sid)
    before = await append_many(a.broker, sid, 3)
    await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) == 3)

    server.stop()
    assert not await a.broker.ping()
    with pytest.raises(ServiceUnavailable):
        await a.broker.append(sid, "progress", body(4), False)
    server.start()
    await eventually(a.broker.ping)

    after = await a.broker.append(sid, "progress", body(1), False)
    assert after.seq == 1 and after.epoch != before[0].epoch
    replay = await b.broker.read(sid, before[-1].position)
    assert replay.gap and [e.id for e in replay.events] == [after.id]
    await b.recorder.wait_until(lambda: b.recorder.of(sid)[-1].id == after.id, timeout=10)
    assert b.recorder.seqs(sid) == [1, 2, 3, 1]


async def restart_from_snapshot(server: RedisServer, then: Callable[[], Awaitable[object]]) -> None:
    """Stop ``server`` and start it again from its last snapshot (a ``SAVE``), losing what
    was written after it, as a Redis that saves RDB snapshots, or appends to its AOF every
    second, does after a crash, and a failover to a replica that lagged; then wait for
    ``then()``."""
    server.stop()  # with no save points configured, nothing more is written
    server.start()  # loads dump.rdb from its directory
    await then()


async def save(url: str) -> None:
    admin = Redis.from_url(url)
    try:
        await admin.save()
    finally:
        await admin.aclose()


async def test_redis_back_from_an_older_snapshot_gives_watchers_a_new_epoch(
    make_node: NodeFactory, own_redis: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis comes back without its last writes (seq 4 seen, seq 2 restored): the process
    watching the session sees, catching up, that the stream is behind what it delivered,
    and gives it a new epoch, rather than take the next events, which reuse seqs 3 and 4,
    for ones it already delivered and drop them. Its listener gets the retained events
    under the new epoch (the hub turns that into a gap notice), then the next ones."""
    server = own_redis()
    a = await make_node(server.url, retry_budget=0.3)
    b = await make_node(server.url)
    sid = new_session_id()
    await b.broker.watch(sid)
    before = await append_many(a.broker, sid, 2)
    await save(server.url)
    before += await append_many(a.broker, sid, 2, start=3)
    await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2, 3, 4])

    await restart_from_snapshot(server, lambda: eventually(b.broker.ping))
    await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) == 6, timeout=10)
    caught_up = b.recorder.of(sid)[4:]
    assert [e.seq for e in caught_up] == [1, 2]
    assert {e.epoch for e in caught_up} != {before[0].epoch}
    assert [e.payload for e in caught_up] != [e.payload for e in before[:2]]  # new ids
    assert any(r.message.startswith("redis lost writes") for r in caplog.records)

    await eventually(a.broker.ping)
    after = await a.broker.append(sid, "progress", body(5), False)
    assert (after.epoch, after.seq) == (caught_up[0].epoch, 3)
    await b.recorder.wait_until(lambda: b.recorder.of(sid)[-1].id == after.id, timeout=10)


async def test_a_process_appending_to_a_stream_behind_what_it_stored_starts_a_new_epoch(
    make_node: NodeFactory, own_redis: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A process (a workflow's, with no one watching the session anywhere) stored seq 4;
    Redis comes back with seq 2. Its next append takes a new epoch instead of storing a
    second seq 3, so that a subscriber anywhere that has the first seq 3 is told."""
    server = own_redis()
    a = await make_node(server.url, retry_budget=0.3)
    sid = new_session_id()
    before = await append_many(a.broker, sid, 2)
    await save(server.url)
    before += await append_many(a.broker, sid, 2, start=3)

    await restart_from_snapshot(server, lambda: eventually(a.broker.ping))
    after = await a.broker.append(sid, "progress", body(5), False)
    assert after.seq == 3 and after.epoch != before[0].epoch
    assert [r.message for r in caplog.records if "lost writes" in r.message] == [
        f"redis lost writes: session {sid} holds less than this process saw (up to "
        f"{before[-1].id}); it goes on under a new epoch {after.epoch}, and its "
        "subscribers are told of the gap"
    ]
    replay = await a.broker.read(sid, before[-1].position)
    assert replay.gap and [e.seq for e in replay.events] == [1, 2, 3]
    assert {e.epoch for e in replay.events} == {after.epoch}
    again = await a.broker.append(sid, "progress", body(6), False)
    assert (again.epoch, again.seq) == (after.epoch, 4)


async def test_an_append_checks_the_furthest_this_process_saw_stored_or_delivered(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """A process stored seq 2 and delivered up to seq 4 (another process stored 3 and 4);
    the stream is then put back to seq 3 under its live connection (nothing breaks it:
    a failover behind a proxy that keeps client connections). Its next append goes by
    the further of the two, and takes a new epoch rather than a second seq 4."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    await a.broker.watch(sid)
    before = await append_many(a.broker, sid, 2)
    before += await append_many(b.broker, sid, 1, start=3)
    put_back = await snapshot(raw_redis, list(keys_of(a.broker, sid)))
    before += await append_many(b.broker, sid, 1, start=4)
    await a.recorder.wait_until(lambda: a.recorder.seqs(sid) == [1, 2, 3, 4])
    await put_back()

    after = await a.broker.append(sid, "progress", body(5), False)
    assert after.seq == 4 and after.epoch != before[0].epoch
    await a.recorder.wait_until(lambda: a.recorder.of(sid)[-1].id == after.id)


async def test_a_catch_up_redis_refuses_to_rewind_is_tried_again_until_it_takes_it(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """The stream is put back to seq 2 under a process that delivered seq 4, and Redis,
    out of memory, refuses the new epoch's write when the live connection catches up:
    the catch-up fails, and is tried again on each new connection, until Redis takes it
    and the listener gets the stream under its new epoch."""
    server = own_redis()
    a, b = await make_node(server.url), await make_node(server.url)
    sid = new_session_id()
    await b.broker.watch(sid)
    before = await append_many(a.broker, sid, 2)
    admin = Redis.from_url(server.url)
    try:
        put_back = await snapshot(admin, list(keys_of(a.broker, sid)))
        before += await append_many(a.broker, sid, 2, start=3)
        await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2, 3, 4])
        await put_back()
        async with out_of_memory(admin):
            connections = b.broker._live.connections
            await admin.client_kill_filter(_type="pubsub")
            await eventually(lambda: b.broker._live.connections >= connections + 2)  # refused
        await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) == 6, timeout=10)
    finally:
        await admin.aclose()
    rewound = b.recorder.of(sid)[4:]
    assert [e.seq for e in rewound] == [1, 2] and rewound[0].epoch != before[0].epoch


async def test_a_process_remembers_where_it_stored_for_its_latest_sessions_only(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a process remembers of the streams it appended to is bounded: the sessions
    appended to longest ago are forgotten first."""
    monkeypatch.setattr(redis_broker_module, "_STORED_SESSIONS", 3)
    node = await make_node()
    sids = [new_session_id() for _ in range(4)]
    for sid in sids:
        await append_many(node.broker, sid, 1)
    await append_many(node.broker, sids[1], 1, start=2)  # now the newest
    assert list(node.broker._stored) == [sids[2], sids[3], sids[1]]
    assert node.broker._stored[sids[1]][1] == 2


async def test_ping_is_false_while_redis_is_down_and_recovers(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """ping reports False while Redis is down, quickly, and True again once it is back."""
    server = own_redis()
    node = await make_node(server.url, ping_timeout=0.5)
    assert await node.broker.ping()
    server.stop()
    async with asyncio.timeout(2):
        assert await node.broker.ping() is False
    server.start()
    await eventually(node.broker.ping)
    assert (await node.broker.append(new_session_id(), "progress", body(1), False)).seq == 1


async def test_append_retries_until_redis_returns(
    make_node: NodeFactory, own_redis: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that fails because Redis is down is retried with back-off, and succeeds
    when Redis returns within the retry budget."""
    server = own_redis()
    node = await make_node(server.url, retry_budget=TIMEOUT)
    attempts = CountCalls(node.broker._run_appends)
    monkeypatch.setattr(node.broker, "_run_appends", attempts)
    server.stop()
    append = asyncio.create_task(node.broker.append(new_session_id(), "progress", body(1), False))
    await eventually(lambda: attempts.calls >= 2)
    server.start()
    stored = await append
    assert stored.seq == 1


async def test_errors_are_sanitized(
    make_node: NodeFactory, own_redis: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """When Redis is unreachable the error, the logs and repr() hold no URL or password."""
    server = own_redis(password="pw-Very-Secret-42")
    node = await make_node(server.url, retry_budget=0.2, watch_timeout=0.3)
    assert await node.broker.ping()
    server.stop()
    caplog.set_level(logging.DEBUG, logger="server.brokers.redis")
    caplog.set_level(logging.DEBUG, logger="server.brokers.redis_live")
    errors: list[ServiceUnavailable] = []
    for call in (
        lambda: node.broker.append(new_session_id(), "progress", body(1), False),
        lambda: node.broker.read(new_session_id(), None),
        lambda: node.broker.info(new_session_id()),
        lambda: node.broker.claim(new_session_id()),
        lambda: node.broker.watch(new_session_id()),
    ):
        with pytest.raises(ServiceUnavailable) as caught:
            await call()
        errors.append(caught.value)
    texts = (
        [str(e) for e in errors] + [repr(node.broker)] + [r.getMessage() for r in caplog.records]
    )
    for text in texts:
        assert "pw-Very-Secret-42" not in text
        assert str(server.port) not in text and "127.0.0.1" not in text
    assert all(e.code == "service_unavailable" and e.status == 503 for e in errors)


async def watch_once_back(broker: RedisBroker, session_id: str) -> None:
    """Watch ``session_id`` as soon as Redis is back: the reader reconnects with back-off,
    and a watch before it has fails."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                await broker.watch(session_id)
                return
            except ServiceUnavailable:
                continue


async def test_watch_while_down_fails_and_works_once_redis_is_back(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """watch raises ServiceUnavailable while Redis is down (unwatch never raises); after
    Redis returns, watching and live delivery work without a restart."""
    server = own_redis()
    a = await make_node(server.url)
    b = await make_node(server.url, watch_timeout=0.3)
    sid = new_session_id()
    server.stop()
    with pytest.raises(ServiceUnavailable):
        await b.broker.watch(sid)
    await b.broker.unwatch(sid)
    server.start()
    await eventually(a.broker.ping)
    await watch_once_back(b.broker, sid)
    stored = await a.broker.append(sid, "progress", body(1), False)
    await b.recorder.wait_until(lambda: [e.id for e in b.recorder.of(sid)] == [stored.id])


async def test_watches_retried_through_an_outage_do_not_pile_up(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """Clients retry their streams all through an outage, and each retry asks to watch:
    what the process keeps for the watches waiting stays one entry per session, however
    many came and gave up, and the session is watched once Redis is back."""
    server = own_redis()
    node = await make_node(server.url, watch_timeout=0.05)
    sid = new_session_id()
    channel = node.broker.channel(sid)
    server.stop()
    await eventually(lambda: node.broker._live._life is None)
    for _ in range(30):
        with pytest.raises(ServiceUnavailable):
            await node.broker.watch(sid)
    batches = node.broker._live._inflight[channel]
    assert len(batches) == 1 and len(batches[0]) == 1
    server.start()
    await watch_once_back(node.broker, sid)
    assert channel not in node.broker._live._inflight


async def test_close_is_idempotent(make_node: NodeFactory) -> None:
    """close() may be called twice; a closed broker is not ready."""
    node = await make_node()
    await node.broker.watch(new_session_id())
    await node.broker.close()
    await node.broker.close()
    assert await node.broker.ping() is False


async def test_memory_per_session_stays_small(make_node: NodeFactory, raw_redis: Redis) -> None:
    """A 60-event workflow costs a few tens of KiB in Redis (docs/REDIS.md)."""
    node = await make_node()
    sid = new_session_id()
    status = "Analysing demand for the next quarter"
    for n in range(60):
        text = body(n, agent="demand", status=status, progress=n, data={"step": n})
        await node.broker.append(sid, "agent_status", text, n == 59)
    keys = [*keys_of(node.broker, sid), node.broker._nonce_seqs_key(sid)]  # nonces: still there
    used = sum([await raw_redis.memory_usage(key) or 0 for key in keys])
    assert used < 64 * 1024, used


async def test_quick_unwatch_then_watch_stays_subscribed(make_node: NodeFactory) -> None:
    """An unwatch immediately followed by a watch leaves the session watched."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    await b.broker.watch(sid)
    await asyncio.gather(b.broker.unwatch(sid), b.broker.watch(sid))
    stored = await a.broker.append(sid, "progress", body(1), False)
    await b.recorder.wait_until(lambda: [e.id for e in b.recorder.of(sid)] == [stored.id])


# --- with the hub ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_hubs(redis_url: str) -> AsyncIterator[tuple[Hub, Hub]]:
    """Two started hubs on one Redis, as two server processes would be; both closed after."""
    prefix = f"test-{secrets.token_hex(4)}"
    hubs = [
        Hub(RedisBroker(redis_url, 100, 60, key_prefix=prefix), queue_size=100, metrics=Metrics())
        for _ in range(2)
    ]
    try:
        for hub in hubs:
            await hub.start()
        yield hubs[0], hubs[1]
    finally:
        for hub in hubs:
            await hub.close()


async def test_hubs_in_two_processes_stream_and_resume_one_session(redis_url: str) -> None:
    """A workflow's events published through hub A reach a subscriber of hub B in order, and
    a subscriber resuming on B from an id gets exactly the events after it."""
    sid = new_session_id()
    async with two_hubs(redis_url) as (hub_a, hub_b):
        async with hub_b.subscribe(sid) as subscription:
            published = [
                await hub_a.publish(
                    ProgressEvent(session_id=sid, agent="orchestrator", status="step", progress=n)
                )
                for n in range(0, 100, 20)
            ]
            published.append(
                await hub_a.publish(CompleteEvent(session_id=sid, agent="orchestrator", final=True))
            )
            received = []
            async with asyncio.timeout(TIMEOUT):
                while not subscription.finished:
                    frame = await subscription.get(TIMEOUT)
                    if frame is not None:
                        received.append(frame)
        assert [f.id for f in received] == [e.id for e in published]
        async with hub_b.subscribe(sid, published[1].id) as resumed:
            rest = [resumed.get_nowait() for _ in range(len(published) - 2)]
            assert [f.id for f in rest if f is not None] == [e.id for e in published[2:]]


async def test_the_publishing_process_hands_its_events_over_at_once_and_once(
    redis_url: str,
) -> None:
    """On the process that publishes, a subscriber has the event when ``publish`` returns,
    as with the memory broker; the copy Redis echoes back through pub/sub is dropped.
    Events another process stores in between still arrive, in order."""
    sid = new_session_id()

    def event(n: int) -> ProgressEvent:
        return ProgressEvent(session_id=sid, agent="orchestrator", status="step", progress=n)

    async with two_hubs(redis_url) as (here, elsewhere), here.subscribe(sid) as subscription:
        first = await here.publish(event(1))
        # No await since publish returned, yet it is there: delivered as soon as Redis stored
        # it (here, or by its echo if that was read first: the same event, dropped once).
        delivered = subscription.get_nowait()
        assert isinstance(delivered, StoredEvent)
        assert (delivered.id, delivered.payload) == (first.id, first.payload)
        second = await elsewhere.publish(event(2))  # reaches `here` after first's echo
        third = await here.publish(event(3))
        # Redis sends a channel's messages in order: once the fourth is here, the
        # echoes of the first and the third have been read (and must have been dropped).
        fourth = await elsewhere.publish(event(4))
        received = [first]
        async with asyncio.timeout(TIMEOUT):
            while received[-1].seq < 4:
                frame = await subscription.get(TIMEOUT)
                if isinstance(frame, StoredEvent):
                    received.append(frame)
        assert [f.id for f in received] == [e.id for e in (first, second, third, fourth)]
        assert subscription.get_nowait() is None


async def test_a_process_clock_that_is_off_does_not_change_how_long_nonces_are_kept(
    make_node: NodeFactory, raw_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose wall clock is an hour ahead appends first: the nonces' hash is
    still set aside one window later, by Redis's clock (it never was with the time taken
    from the appending process)."""
    node = await make_node(op_timeout=0.2, retry_budget=0.3)  # a window of 1 s
    sid = new_session_id()
    ahead = time.time() + 3600
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: ahead)
        await append_many(node.broker, sid, 1)
    await asyncio.sleep(1.1)  # the window passing is what is tested
    await append_many(node.broker, sid, 1, start=2)
    assert len(await raw_redis.hkeys(node.broker._earlier_nonce_seqs_key(sid))) == 1


async def test_nonces_turn_every_window_while_appends_keep_coming(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Appends several times a window: the nonces' hash is still set aside once it is a
    window old (its expiry is set when it begins, not moved on by each append), so it
    holds only the newest window's nonces and the earlier hash the one before."""
    node = await make_node(op_timeout=0.2, retry_budget=0.3)  # a window of 1 s
    sid = new_session_id()
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 2.5:  # appends every 0.25 s: the time is the test
        n += 1
        await append_many(node.broker, sid, 1, start=n)
        await asyncio.sleep(0.25)
    current = await raw_redis.hlen(node.broker._nonce_seqs_key(sid))
    earlier = await raw_redis.hlen(node.broker._earlier_nonce_seqs_key(sid))
    assert n >= 6 and 0 < earlier <= 5 and 0 < current <= 5, (n, earlier, current)
