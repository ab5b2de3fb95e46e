"""The session hub over each broker, with no server: ordering, replay, gaps, bounds,
eviction, fan-out and the slow-consumer policy.

Every test that is about the hub's promises runs on the in-memory broker and on Redis
(``broker_kind``). The Redis broker delivers live events from its pub/sub reader, a little
after ``publish`` returns, so live events are awaited (:func:`receive`); a replay is queued
by the time ``subscribe`` yields on both (:func:`drain`). The tests of the in-memory
broker's own expiry sweep (a fake clock) run on memory only, beside their Redis
counterparts (a real, tiny ``session_ttl``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from server.brokers.base import Broker, Replay
from server.brokers.memory import MemoryBroker
from server.brokers.redis import RedisBroker
from server.errors import ServiceUnavailable, SessionEnded
from server.hub import Hub, Subscription, SubscriptionClosed
from server.messages import (
    INVALID_MESSAGE,
    REPLAY_GAP,
    CompleteEvent,
    ControlEvent,
    ProgressEvent,
    StoredEvent,
    StreamPosition,
)
from server.metrics import Metrics
from tests.conftest import BOTH_BROKERS
from tests.timing import EVENT_TIMEOUT, POLL_INTERVAL

SID = "session-0001"

Frame = StoredEvent | ControlEvent
HubFactory = Callable[..., Awaitable[Hub]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(n: int, session_id: str = SID) -> ProgressEvent:
    return ProgressEvent(
        session_id=session_id, agent="demand", status=f"step {n}", progress=n % 101
    )


def final(session_id: str = SID) -> CompleteEvent:
    return CompleteEvent(session_id=session_id, agent="orchestrator", final=True)


@pytest.fixture
async def make_hub(broker_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[HubFactory]:
    """Started hubs on the broker ``broker_kind`` names (on Redis: the shared test server,
    under a key prefix of this test's own); each is closed at the end of the test."""
    redis_url = request.getfixturevalue("redis_url") if broker_kind == "redis" else None
    prefix = f"test-{secrets.token_hex(4)}"
    hubs: list[Hub] = []

    async def make(buffer_size: int = 100, queue_size: int = 50, ttl: float = 60.0) -> Hub:
        broker: Broker
        if redis_url is None:
            broker = MemoryBroker(buffer_size, ttl)
        else:
            broker = RedisBroker(redis_url, buffer_size, ttl, key_prefix=prefix)
        hub = Hub(broker, queue_size=queue_size, metrics=Metrics())
        hubs.append(hub)
        await hub.start()
        return hub

    yield make
    for hub in hubs:
        await hub.close()  # idempotent: a test may have closed it already


async def make_memory_hub(
    ttl: float = 60.0, clock: Clock | None = None, buffer_size: int = 100
) -> Hub:
    """A hub on the in-memory broker with a fake clock (its expiry sweep)."""
    broker = MemoryBroker(buffer_size, ttl, clock=clock or Clock())
    hub = Hub(broker, queue_size=50, metrics=Metrics(), buffer_size=buffer_size)
    await hub.start()
    return hub


class UnavailableReads:
    """A broker's ``read`` that fails as an unavailable event store would, ``times``
    times (``None``: always), then reads; the real one is kept in :attr:`read`."""

    def __init__(self, broker: Broker, times: int | None = None) -> None:
        self.read = broker.read
        self.times = times
        self.failures = 0

    async def __call__(
        self, session_id: str, after: StreamPosition | None, limit: int | None = None
    ) -> Replay:
        if self.times is None or self.failures < self.times:
            self.failures += 1
            raise ServiceUnavailable("down")
        return await self.read(session_id, after, limit)


async def drain(sub: Subscription) -> list[Frame]:
    """Everything queued for ``sub`` right now (a replay is queued once subscribed)."""
    frames = []
    while (frame := sub.get_nowait()) is not None:
        frames.append(frame)
    return frames


async def receive(sub: Subscription, count: int, timeout: float = EVENT_TIMEOUT) -> list[Frame]:
    """Frames up to and including the ``count``-th stored event, awaiting live ones."""
    frames: list[Frame] = []
    async with asyncio.timeout(timeout):
        while len(seqs(frames)) < count:
            frame = await sub.get(timeout)
            if frame is not None:
                frames.append(frame)
    return frames


def seqs(frames: list[Frame]) -> list[int]:
    return [f.seq for f in frames if isinstance(f, StoredEvent)]


def codes(frames: list[Frame]) -> list[str]:
    return [str(json.loads(f.payload)["code"]) for f in frames if f.type == "error"]


# --- on both brokers -----------------------------------------------------------------------


@BOTH_BROKERS
async def test_seq_is_gapless_and_ids_carry_the_epoch(make_hub: HubFactory) -> None:
    """Stored events get seq 1, 2, 3 ... and ids "<epoch>-<seq>"."""
    hub = await make_hub()
    stored = [await hub.publish(progress(i)) for i in range(1, 6)]
    assert [e.seq for e in stored] == [1, 2, 3, 4, 5]
    epochs = {str(e.id).rsplit("-", 1)[0] for e in stored}
    assert len(epochs) == 1
    assert all(e.to_dict()["id"] == e.id and e.to_dict()["seq"] == e.seq for e in stored)


@BOTH_BROKERS
async def test_new_subscriber_gets_everything_retained_then_live(make_hub: HubFactory) -> None:
    """A subscriber with no resume point gets the whole retained story, then live events."""
    hub = await make_hub()
    for i in range(1, 4):
        await hub.publish(progress(i))
    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == [1, 2, 3]
        await hub.publish(progress(4))
        assert seqs(await receive(sub, 1)) == [4]


@BOTH_BROKERS
@pytest.mark.parametrize("resume_after", range(0, 11))
async def test_replay_from_every_position(make_hub: HubFactory, resume_after: int) -> None:
    """Resuming after event k yields exactly k+1 .. n, no gap notice."""
    hub = await make_hub()
    stored = [await hub.publish(progress(i)) for i in range(1, 11)]
    last_id = stored[resume_after - 1].id if resume_after else None
    async with hub.subscribe(SID, last_id) as sub:
        frames = await drain(sub)
    assert codes(frames) == []
    assert seqs(frames) == list(range(resume_after + 1, 11))


@BOTH_BROKERS
async def test_resume_at_the_newest_event_then_live_events_follow_once(
    make_hub: HubFactory,
) -> None:
    """Resuming at the newest event of a running stream (a reconnect while nothing new was
    published) replays nothing, then delivers each later event once: it is not taken for
    a gap that sends the whole story again."""
    hub = await make_hub()
    stored = [await hub.publish(progress(i)) for i in range(1, 4)]
    async with hub.subscribe(SID, stored[-1].id) as sub:
        assert await drain(sub) == []
        await hub.publish(progress(4))
        await hub.publish(final())
        frames = await receive(sub, 2)
        assert sub.finished
    assert seqs(frames) == [4, 5] and codes(frames) == []


@BOTH_BROKERS
@pytest.mark.parametrize(
    "make_id",
    [
        pytest.param(lambda epoch: f"{epoch}-2", id="trimmed"),
        pytest.param(lambda epoch: "deadbeef-7", id="earlier-epoch"),
        pytest.param(lambda epoch: f"{epoch}-99", id="ahead"),
        pytest.param(lambda epoch: "not an id", id="malformed"),
        pytest.param(lambda epoch: "abc-", id="malformed-no-seq"),
        pytest.param(lambda epoch: f"{epoch}-0", id="zero"),
        pytest.param(lambda epoch: "x" * 5000, id="huge"),
    ],
)
async def test_unservable_positions_get_replay_gap_then_everything(
    make_hub: HubFactory, make_id: Callable[[str], str]
) -> None:
    """A position that cannot be served: replay_gap first, then every retained event."""
    hub = await make_hub(buffer_size=5)
    stored = [await hub.publish(progress(i)) for i in range(1, 11)]  # 6..10 retained
    epoch = stored[0].epoch
    async with hub.subscribe(SID, make_id(epoch)) as sub:
        frames = await drain(sub)
    assert codes(frames) == [REPLAY_GAP]
    assert frames[0].type == "error" and frames[0].id is None  # control: no id
    assert seqs(frames) == [6, 7, 8, 9, 10]


@BOTH_BROKERS
async def test_resume_on_unknown_session_gets_gap_then_waits(make_hub: HubFactory) -> None:
    """Resuming into a session that has no stream yet is a gap; live events then flow."""
    hub = await make_hub()
    async with hub.subscribe(SID, "cafe1234-3") as sub:
        assert codes(await drain(sub)) == [REPLAY_GAP]
        await hub.publish(progress(1))
        assert seqs(await receive(sub, 1)) == [1]


@BOTH_BROKERS
async def test_buffer_keeps_only_the_newest_events(make_hub: HubFactory) -> None:
    """The per-session buffer is bounded to buffer_size."""
    hub = await make_hub(buffer_size=3)
    for i in range(1, 8):
        await hub.publish(progress(i))
    replay = await hub.broker.read(SID, None)
    assert [e.seq for e in replay.events] == [5, 6, 7]


@BOTH_BROKERS
async def test_nothing_is_stored_after_the_final_event(make_hub: HubFactory) -> None:
    """Publishing after the final event raises SessionEnded, and the stream is unchanged."""
    hub = await make_hub()
    await hub.publish(progress(1))
    end = await hub.publish(final())
    with pytest.raises(SessionEnded):
        await hub.publish(progress(2))
    info = await hub.broker.info(SID)
    assert info is not None and info.ended and info.final_id == end.id and info.last_seq == 2


@BOTH_BROKERS
async def test_subscription_finishes_after_final_and_resume_at_final_is_finished(
    make_hub: HubFactory,
) -> None:
    """After the final event a subscription is finished; resuming at it gives nothing more."""
    hub = await make_hub()
    await hub.publish(progress(1))
    end = await hub.publish(final())
    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == [1, 2]
        assert sub.finished
    async with hub.subscribe(SID, end.id) as sub:
        assert await drain(sub) == []
        assert sub.finished


@BOTH_BROKERS
async def test_many_subscribers_share_one_encoding(make_hub: HubFactory) -> None:
    """Every subscriber gets the same bytes object: an event is encoded once."""
    hub = await make_hub()
    async with hub.subscribe(SID) as a, hub.subscribe(SID) as b, hub.subscribe(SID) as c:
        await hub.publish(progress(1))
        frames = [(await receive(s, 1))[0] for s in (a, b, c)]
    assert frames[0].payload is frames[1].payload is frames[2].payload


@BOTH_BROKERS
async def test_sessions_are_isolated(make_hub: HubFactory) -> None:
    """A subscriber sees only its own session's events."""
    hub = await make_hub()
    async with hub.subscribe("session-a1") as a, hub.subscribe("session-b1") as b:
        await hub.publish(progress(1, "session-a1"))
        await hub.publish(progress(2, "session-b1"))
        await hub.publish(progress(3, "session-a1"))
        await hub.publish(final("session-b1"))
        got_a = await receive(a, 2)
        got_b = await receive(b, 2)  # its final event comes after anything else for b
        assert [f.session_id for f in got_a] == ["session-a1"] * 2  # type: ignore[union-attr]
        assert [f.session_id for f in got_b] == ["session-b1"] * 2  # type: ignore[union-attr]
        assert await drain(a) == []


@BOTH_BROKERS
async def test_slow_consumer_is_closed_and_never_delays_the_others(make_hub: HubFactory) -> None:
    """A subscriber that falls queue_size behind is closed; a reading one gets everything."""
    hub = await make_hub(queue_size=10)
    async with hub.subscribe(SID) as slow, hub.subscribe(SID) as fast:
        got: list[int] = []
        for i in range(1, 31):
            await hub.publish(progress(i))
            got += seqs(await receive(fast, 1))
        assert got == list(range(1, 31))
        with pytest.raises(SubscriptionClosed) as closed:
            await drain(slow)
        assert closed.value.reason == "slow_consumer"
    # It resumes from the buffer with nothing lost.
    async with hub.subscribe(SID, None) as again:
        assert seqs(await drain(again)) == list(range(1, 31))


@BOTH_BROKERS
async def test_replay_larger_than_the_live_queue_is_not_a_slow_consumer(
    make_hub: HubFactory,
) -> None:
    """The replay backlog does not count against the live-queue bound."""
    hub = await make_hub(buffer_size=200, queue_size=5)
    for i in range(1, 101):
        await hub.publish(progress(i))
    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == list(range(1, 101))


@BOTH_BROKERS
async def test_events_published_during_replay_are_neither_lost_nor_doubled(
    make_hub: HubFactory,
) -> None:
    """Events stored while a subscriber reads its replay arrive once, in order: the read
    returns, two events are stored and handed to the hub live, and only then is the
    replay queued."""
    hub = await make_hub()
    broker = hub.broker
    read = broker.read

    def held_back() -> int:
        local = hub._sessions.get(SID)
        pending = [s._pending for s in (local.members if local else ())]
        return sum(len(p or ()) for p in pending)

    async def read_then_publish(session_id, after, limit=None):  # type: ignore[no-untyped-def]
        replay = await read(session_id, after, limit)
        # Events land between the read and the hand-over to live delivery...
        await broker.append(session_id, "progress", progress(98).model_dump_json(), False)
        await broker.append(session_id, "progress", progress(99).model_dump_json(), False)
        # ... and reach the hub before the replay is queued (Redis: through pub/sub).
        async with asyncio.timeout(EVENT_TIMEOUT):
            while held_back() < 2:
                await asyncio.sleep(POLL_INTERVAL)
        return replay

    broker.read = read_then_publish  # type: ignore[method-assign]
    await hub.publish(progress(1))
    async with hub.subscribe(SID) as sub:
        await hub.publish(progress(4))
        assert seqs(await receive(sub, 4)) == [1, 2, 3, 4]


@BOTH_BROKERS
async def test_subscribers_are_removed_on_exit_and_on_cancellation(make_hub: HubFactory) -> None:
    """Leaving a subscription, normally or by cancellation, leaves nothing behind."""
    hub = await make_hub()
    async with hub.subscribe(SID):
        assert hub.subscriber_count == 1
    assert hub.subscriber_count == 0 and hub.session_count == 0

    entered = asyncio.Event()

    async def waiter() -> None:
        async with hub.subscribe(SID) as sub:
            entered.set()
            await sub.get(timeout=3600)

    task = asyncio.create_task(waiter())
    await asyncio.wait_for(entered.wait(), EVENT_TIMEOUT)
    assert hub.subscriber_count == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hub.subscriber_count == 0 and hub.session_count == 0


async def test_a_subscription_whose_replay_cannot_be_read_leaves_nothing_behind() -> None:
    """The event store fails while a subscriber joins: the caller gets the error, and no
    subscriber, session or watch is left (a later subscriber joins as if first)."""
    hub = await make_memory_hub()
    broker = hub.broker
    reads = UnavailableReads(broker)
    broker.read = reads  # type: ignore[method-assign]
    try:
        with pytest.raises(ServiceUnavailable):
            async with hub.subscribe(SID):
                pytest.fail("entered a subscription that has no replay")
        assert reads.failures == 1
        assert hub.subscriber_count == 0 and hub.session_count == 0
    finally:
        broker.read = reads.read  # type: ignore[method-assign]
    await hub.publish(progress(1))
    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == [1]
    await hub.close()


@BOTH_BROKERS
async def test_get_wakes_on_publish_and_times_out_when_idle(make_hub: HubFactory) -> None:
    """get() returns a live event as soon as it is published, None when the wait runs out."""
    hub = await make_hub()
    async with hub.subscribe(SID) as sub:
        assert await sub.get(timeout=0.01) is None
        waiting = asyncio.create_task(sub.get(timeout=EVENT_TIMEOUT))
        await asyncio.sleep(0)  # let it start waiting
        await hub.publish(progress(1))
        frame = await waiting
        assert isinstance(frame, StoredEvent) and frame.seq == 1


@BOTH_BROKERS
async def test_close_all_ends_every_subscription_for_shutdown(make_hub: HubFactory) -> None:
    """Shutdown closes every subscription with reason 'shutdown'."""
    hub = await make_hub()
    async with hub.subscribe(SID) as sub:
        hub.close_all("shutdown")
        with pytest.raises(SubscriptionClosed) as closed:
            await sub.get(timeout=EVENT_TIMEOUT)
        assert closed.value.reason == "shutdown"


async def settle(hub: Hub) -> None:
    """Await the hub's re-reads on their way, and those they start, up to ten rounds."""
    for _ in range(10):
        if not hub._background:
            return
        await asyncio.gather(*list(hub._background))


@BOTH_BROKERS
@pytest.mark.parametrize("published", [3, 0], ids=["moved on", "gone"])
async def test_a_late_event_of_an_epoch_the_stream_left_is_dropped_not_chased(
    make_hub: HubFactory, monkeypatch: pytest.MonkeyPatch, published: int
) -> None:
    """A live event of an epoch the stream has moved on from (a message sent before the
    stream took a new epoch, or before it was lost, read late) sends its subscriber to
    re-read once; the re-read finds the stream in its present epoch, or none, and the
    late event, which came before the read, is dropped, rather than passed on again to
    start another re-read, for ever."""
    hub = await make_hub()
    for i in range(1, published + 1):
        await hub.publish(progress(i))
    reads = 0
    read = hub.broker.read

    async def counted(session_id: str, after: StreamPosition | None) -> Replay:
        nonlocal reads
        reads += 1
        return await read(session_id, after)

    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == list(range(1, published + 1))
        monkeypatch.setattr(hub.broker, "read", counted)
        late = StoredEvent(SID, "0123456789ab", 2, "progress", False, progress(2).model_dump_json())
        sub.deliver(late)
        await settle(hub)
        assert not hub._background and reads == 1
        assert await drain(sub) == []
        await hub.publish(progress(published + 1))
        assert seqs(await receive(sub, 1)) == [published + 1]


async def test_a_re_read_while_the_final_event_waits_unsent_still_sends_it() -> None:
    """A re-read that starts after the final event (queued, not sent yet) finds nothing
    new and the session ended; the subscription is not finished until the final event
    has been taken from its queue, so its transport sends what was queued."""
    hub = await make_memory_hub()
    try:
        async with hub.subscribe(SID) as sub:
            await hub.publish(progress(1))
            await hub.publish(final())
            late = StoredEvent(SID, "0123456789ab", 1, "progress", False, "{}")
            sub.deliver(late)  # sends it to re-read from the final event
            await settle(hub)
            assert not sub.finished
            assert seqs(await drain(sub)) == [1, 2]
            assert sub.finished
    finally:
        await hub.close()


# --- expiry: the in-memory sweep (fake clock), and Redis's own (a tiny session_ttl) ----------


async def test_ended_and_idle_sessions_are_evicted_after_ttl() -> None:
    """After session_ttl without activity a session is forgotten; a new one gets a new epoch."""
    clock = Clock()
    hub = await make_memory_hub(ttl=60.0, clock=clock)
    broker = hub.broker
    assert isinstance(broker, MemoryBroker)
    first = await hub.publish(progress(1))
    await hub.publish(final())
    assert await broker.claim("never-started")  # an idle session that never started
    clock.now += 59
    assert broker.sweep() == 0
    clock.now += 2
    assert broker.sweep() == 2
    assert broker.session_count() == 0
    assert await broker.info(SID) is None
    again = await hub.publish(progress(1))
    assert again.seq == 1 and again.epoch != first.epoch
    await hub.close()


async def test_subscriber_on_a_recreated_stream_gets_a_gap_notice() -> None:
    """If the stream is lost and recreated under a live subscriber, it is told (replay_gap)."""
    clock = Clock()
    hub = await make_memory_hub(ttl=60.0, clock=clock)
    broker = hub.broker
    assert isinstance(broker, MemoryBroker)
    await hub.publish(progress(1))
    await hub.publish(progress(2))
    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == [1, 2]
        clock.now += 120
        broker.sweep()
        await hub.publish(progress(1))  # a new life of the stream: seq 1 again
        rest = await receive(sub, 1)
    assert codes(rest) == [REPLAY_GAP]
    assert seqs(rest) == [1]
    await hub.close()


async def test_a_re_read_that_meets_an_unavailable_store_keeps_the_stream_open() -> None:
    """A subscriber must re-read its session (the stream was recreated) while the event
    store is away: its stream stays open, as open streams do through an outage, the live
    events meanwhile are held, and once the store answers it gets ``replay_gap`` and every
    event of the new life, once and in order. Not a ``slow_consumer`` cut."""
    clock = Clock()
    hub = await make_memory_hub(ttl=60.0, clock=clock)
    broker = hub.broker
    assert isinstance(broker, MemoryBroker)
    reads = UnavailableReads(broker, times=2)

    async with hub.subscribe(SID) as sub:
        await hub.publish(progress(1))
        assert seqs(await receive(sub, 1)) == [1]
        clock.now += 120
        broker.sweep()
        broker.read = reads  # type: ignore[method-assign]
        await hub.publish(progress(1))  # a new life: the subscriber re-reads, and waits
        await hub.publish(progress(2))
        rest = await receive(sub, 2)
        assert reads.failures == 2
        assert codes(rest) == [REPLAY_GAP] and seqs(rest) == [1, 2]
        await hub.publish(progress(3))
        assert seqs(await receive(sub, 1)) == [3]
    assert hub._metrics.registry.get_sample_value(
        "orchestrator_subscriptions_closed_total", {"reason": "slow_consumer"}
    ) in (None, 0)
    await hub.close()


async def test_live_events_held_for_a_waiting_re_read_are_bounded_by_the_queue_size() -> None:
    """While a subscriber's re-read waits for an unavailable event store, its live events
    are held, at most its queue size of them: one more and it is closed as a slow
    consumer (it resumes from the buffer), so a long outage never grows the server's
    memory without bound."""
    clock = Clock()
    hub = await make_memory_hub(ttl=60.0, clock=clock)  # queue_size=50
    broker = hub.broker
    assert isinstance(broker, MemoryBroker)
    await hub.publish(progress(1))
    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == [1]
        clock.now += 120
        broker.sweep()
        broker.read = UnavailableReads(broker)  # type: ignore[method-assign]
        await hub.publish(progress(1))  # a new life: the subscriber re-reads, and waits
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not sub._store_away:
                await asyncio.sleep(POLL_INTERVAL)
        for n in range(2, 51):  # 50 held in all
            await hub.publish(progress(n))
        assert sub._pending is not None and len(sub._pending) == 50
        assert sub._closed is None
        await hub.publish(progress(51))
        assert sub._closed == "slow_consumer"
    await hub.close()


@pytest.mark.parametrize(
    ("buffer_size", "published", "cut_off"),
    [(100, 60, False), (100, 200, False), (100, 201, True), (500, 550, False), (500, 551, True)],
)
async def test_events_published_while_a_join_reads_its_replay_are_held_within_a_bound(
    buffer_size: int, published: int, cut_off: bool
) -> None:
    """More events than a subscriber's queue holds are published while it joins (its
    replay is being read): the replay covers them, and the subscriber gets them, in
    order, without being cut off for events it was never behind on. What it holds back
    meanwhile is bounded all the same: four queue sizes, or a session's whole buffer and
    a queue if more (a Redis catch-up may deliver that much at once); one more cuts it
    off as a slow consumer (it resumes from the buffer)."""
    hub = await make_memory_hub(buffer_size=buffer_size)  # queue_size=50
    broker = hub.broker
    read = broker.read
    reading, release = asyncio.Event(), asyncio.Event()

    async def held_read(
        session_id: str, after: StreamPosition | None, limit: int | None = None
    ) -> Replay:
        reading.set()
        await release.wait()
        return await read(session_id, after, limit)

    broker.read = held_read  # type: ignore[method-assign]
    joining = asyncio.create_task(hub.join(SID, None))
    await reading.wait()
    for n in range(1, published + 1):
        await hub.publish(progress(n))
    release.set()
    sub = await joining
    try:
        if cut_off:
            assert sub._closed == "slow_consumer"
        else:
            retained = min(published, buffer_size)
            got = seqs(await receive(sub, retained))
            assert got == list(range(published - retained + 1, published + 1))
            assert sub._closed is None
    finally:
        await hub.leave(sub)
        await hub.close()


async def test_nothing_follows_the_final_event_once_it_is_taken() -> None:
    """Once the transport has taken the final event (it may still be writing it to a slow
    socket), a heartbeat round or a notice for the connection queues nothing more: the
    final event is the last thing on the stream (PROTOCOL.md)."""
    hub = await make_memory_hub()
    await hub.publish(progress(1))
    await hub.publish(final())
    async with hub.subscribe(SID) as sub:
        frames = await drain(sub)
        assert seqs(frames) == [1, 2] and isinstance(frames[-1], StoredEvent)
        assert frames[-1].final and sub.finished
        await hub.send_heartbeats()
        sub.push_control(ControlEvent.error(SID, INVALID_MESSAGE, "x"))
        assert sub.get_nowait() is None and sub.finished
    await hub.close()


async def test_a_gap_notice_follows_the_events_already_queued() -> None:
    """A subscriber still has old events queued (it has not read them) when the stream is
    recreated: it gets them first, then ``replay_gap``, then the new life's events. A
    client forgets what it derived when the notice comes, so an old event after it would
    be mixed into the new life."""
    clock = Clock()
    hub = await make_memory_hub(ttl=60.0, clock=clock)
    broker = hub.broker
    assert isinstance(broker, MemoryBroker)
    async with hub.subscribe(SID) as sub:
        first = await hub.publish(progress(1))
        second = await hub.publish(progress(2))  # queued: the subscriber reads nothing yet
        clock.now += 120
        broker.sweep()
        again = await hub.publish(progress(1))
        registry = hub._metrics.registry
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not registry.get_sample_value("orchestrator_replay_gaps_total"):
                await asyncio.sleep(POLL_INTERVAL)  # the hub re-reads the stream, finds the gap
        frames = await receive(sub, 3)
    described = [
        f.id if isinstance(f, StoredEvent) else json.loads(f.payload)["code"] for f in frames
    ]
    assert described == [first.id, second.id, REPLAY_GAP, again.id]
    await hub.close()


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_subscriber_on_an_expired_redis_stream_gets_a_gap_notice(
    make_hub: HubFactory,
) -> None:
    """On Redis too: the session's keys expire under a live subscriber (a tiny
    session_ttl), the stream is created again in a new epoch, and the subscriber gets
    replay_gap, then the new life's events."""
    hub = await make_hub(ttl=0.3)
    first = await hub.publish(progress(1))
    async with hub.subscribe(SID) as sub:
        assert seqs(await drain(sub)) == [1]
        async with asyncio.timeout(EVENT_TIMEOUT):
            while await hub.broker.info(SID) is not None:  # Redis expires the keys
                await asyncio.sleep(POLL_INTERVAL)
        again = await hub.publish(progress(1))
        rest = await receive(sub, 1)
    assert again.seq == 1 and again.epoch != first.epoch
    assert codes(rest) == [REPLAY_GAP]
    assert [f.id for f in rest if isinstance(f, StoredEvent)] == [again.id]
