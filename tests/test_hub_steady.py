"""The hub's steady path, over real sockets: a subscriber that keeps up has its live
events written by the fan-out itself, and leaves that path, without losing its place,
whenever a frame must go through its own queue (a backed-up socket, a frame of its
own, the final event, a gap, a detach).

Each subscriber here has a real TCP connection: the server end is an asyncio
transport the hub writes to, the client end a plain socket the test reads lines from.
A small task stands in for the transport's task: it sends what is queued, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from server.brokers.memory import MemoryBroker
from server.hub import Hub, Sink, Subscription
from server.messages import REPLAY_GAP, ControlEvent, HeartbeatEvent, StoredEvent
from server.metrics import Metrics
from tests.clients import wait_until
from tests.test_hub import SID, Clock, final, progress
from tests.timing import EVENT_TIMEOUT


def as_line(event: StoredEvent | ControlEvent) -> bytes:
    return event.payload + b"\n"


@dataclass
class Peer:
    """One subscriber on one real connection, and what its transport's task sent."""

    subscription: Subscription
    transport: asyncio.Transport
    client: socket.socket
    sent_by_task: list[str]  # the ids (or types, for control frames) the task sent
    buffered: bytes = b""

    def read_now(self) -> list[dict[str, object]]:
        """Whatever has arrived on the client socket, without waiting for more."""
        while True:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buffered += chunk
        *lines, self.buffered = self.buffered.split(b"\n")
        return [json.loads(line) for line in lines]

    async def read(self, count: int) -> list[dict[str, object]]:
        frames: list[dict[str, object]] = []
        async with asyncio.timeout(EVENT_TIMEOUT):
            while len(frames) < count:
                frames += self.read_now()
                if len(frames) < count:
                    await asyncio.sleep(0.005)
        return frames


@contextlib.asynccontextmanager
async def connect(hub: Hub, metrics: Metrics, session_id: str = SID) -> AsyncIterator[Peer]:
    """Subscribe over a fresh socket pair, with a Sink and a stand-in transport task."""
    loop = asyncio.get_running_loop()
    server_end, client_end = socket.socketpair()
    client_end.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server_end)
    async with hub.subscribe(session_id) as subscription:
        peer = Peer(subscription, transport, client_end, [])
        subscription.attach(
            Sink(
                transport,
                as_line,
                metrics.delivered.labels(transport="test"),
                metrics.delivery_latency.labels(transport="websocket"),
            )
        )
        task = asyncio.create_task(_send_queued(peer))
        try:
            yield peer
        finally:
            task.cancel()
            await asyncio.wait({task})
            subscription.detach()
            transport.close()
            client_end.close()


async def _send_queued(peer: Peer) -> None:
    sub = peer.subscription
    while not sub.finished:
        frame = await sub.get(EVENT_TIMEOUT)
        if frame is None:
            continue
        peer.sent_by_task.append(frame.id or frame.type)
        peer.transport.write(frame.payload + b"\n")


@pytest.fixture
async def hub_and_metrics() -> AsyncIterator[tuple[Hub, Metrics, Clock]]:
    clock = Clock()
    metrics = Metrics()
    hub = Hub(MemoryBroker(100, 60.0, clock=clock), queue_size=50, metrics=metrics)
    await hub.start()
    yield hub, metrics, clock
    await hub.close()


async def steady(*peers: Peer) -> None:
    await wait_until(lambda: all(p.subscription.steady for p in peers), "steady subscribers")


@pytest.fixture
async def one_peer(hub_and_metrics: tuple[Hub, Metrics, Clock]) -> AsyncIterator[Peer]:
    """One subscriber on the hub of ``hub_and_metrics``, already steady."""
    hub, metrics, _ = hub_and_metrics
    async with connect(hub, metrics) as peer:
        await steady(peer)
        yield peer


async def test_the_fan_out_writes_steady_subscribers_sockets_itself(
    hub_and_metrics: tuple[Hub, Metrics, Clock],
) -> None:
    """Once caught up, each live event is on every socket when ``publish`` returns: no
    queue, no task switch; each delivery is counted once."""
    hub, metrics, _ = hub_and_metrics
    async with connect(hub, metrics) as a, connect(hub, metrics) as b:
        await steady(a, b)
        for n in range(1, 6):
            stored = await hub.publish(progress(n))
            # No await since the publish: the bytes were written by the fan-out.
            assert [f["id"] for f in a.read_now()] == [stored.id]
            assert [f["id"] for f in b.read_now()] == [stored.id]
        assert a.sent_by_task == b.sent_by_task == []
        assert metrics.delivered.labels(transport="test").value == 10
        assert a.subscription.position == stored.position


async def test_a_backed_up_socket_goes_through_its_queue_and_keeps_its_order(
    hub_and_metrics: tuple[Hub, Metrics, Clock],
) -> None:
    """A subscriber whose socket cannot take more is not written to; its events queue up
    and follow in order, the other subscribers are not held back, and it comes back to the
    steady path once its socket has drained."""
    hub, metrics, _ = hub_and_metrics
    async with connect(hub, metrics) as slow, connect(hub, metrics) as fast:
        await steady(slow, fast)
        await hub.publish(progress(1))
        # Fill the slow one's socket: the kernel takes part, the transport keeps the rest.
        filler = {"id": "filler", "pad": "x" * (1 << 22)}
        slow.transport.write(json.dumps(filler).encode() + b"\n")
        assert slow.transport.get_write_buffer_size() > 0
        published = [await hub.publish(progress(n)) for n in range(2, 6)]
        assert [f["seq"] for f in fast.read_now()] == [1, 2, 3, 4, 5]
        assert not slow.subscription.steady
        frames = await slow.read(6)
        assert [f.get("seq", f["id"]) for f in frames] == [1, "filler", 2, 3, 4, 5]
        assert slow.sent_by_task == [e.id for e in published]
        # Drained, it goes back to the steady path when its task next finds nothing to
        # send: after the next event, which still comes through the task.
        sixth = await hub.publish(progress(6))
        assert [f["id"] for f in await slow.read(1)] == [sixth.id]
        await steady(slow)
        seventh = await hub.publish(progress(7))
        assert [f["id"] for f in slow.read_now()] == [seventh.id]
        assert slow.sent_by_task[-1] == sixth.id


async def test_a_frame_of_its_own_keeps_its_place_between_live_events(
    hub_and_metrics: tuple[Hub, Metrics, Clock], one_peer: Peer
) -> None:
    """A heartbeat answer pushed to a steady subscriber goes out after the events already
    written and before the next ones."""
    hub, _, _ = hub_and_metrics
    peer = one_peer
    await hub.publish(progress(1))
    await hub.publish(progress(2))
    peer.subscription.push_control(ControlEvent.heartbeat(SID))
    await hub.publish(progress(3))
    frames = await peer.read(4)
    assert [f.get("seq", f["type"]) for f in frames] == [1, 2, "heartbeat", 3]
    await steady(peer)
    await hub.publish(progress(4))
    assert [f["seq"] for f in peer.read_now()] == [4]


async def test_the_final_event_is_left_to_the_transports_task(
    hub_and_metrics: tuple[Hub, Metrics, Clock], one_peer: Peer
) -> None:
    """The final event goes through each subscriber's queue, so its task can close the
    connection right after it."""
    hub, _, _ = hub_and_metrics
    peer = one_peer
    await hub.publish(progress(1))
    done = await hub.publish(final())
    frames = await peer.read(2)
    assert [f["type"] for f in frames] == ["progress", "complete"]
    assert peer.sent_by_task == [done.id]
    assert peer.subscription.finished


async def test_a_recreated_stream_under_steady_subscribers_is_a_gap(
    hub_and_metrics: tuple[Hub, Metrics, Clock], one_peer: Peer
) -> None:
    """When the stream no longer continues where the steady subscribers stand (here it
    expired and started again at seq 1), they are told ``replay_gap`` and resume."""
    hub, _, clock = hub_and_metrics
    peer = one_peer
    broker = hub.broker
    assert isinstance(broker, MemoryBroker)
    old = await hub.publish(progress(1))
    clock.now += 120
    broker.sweep()
    new = await hub.publish(progress(1))
    frames = await peer.read(3)
    assert [f["type"] for f in frames] == ["progress", "error", "progress"]
    assert frames[1]["code"] == REPLAY_GAP
    assert [frames[0]["id"], frames[2]["id"]] == [old.id, new.id]
    assert new.epoch != old.epoch


async def test_after_detach_nothing_is_written_by_the_fan_out(
    hub_and_metrics: tuple[Hub, Metrics, Clock], one_peer: Peer
) -> None:
    """``detach`` (before a close frame, say) stops direct writes at once; what follows
    waits in the queue."""
    hub, _, _ = hub_and_metrics
    peer = one_peer
    peer.subscription.detach()
    assert not peer.subscription.steady
    stored = await hub.publish(progress(1))
    assert peer.read_now() == []
    frames = await peer.read(1)
    assert frames[0]["id"] == stored.id
    assert peer.sent_by_task == [stored.id]


async def test_heartbeats_are_written_by_the_hub_to_steady_subscribers(
    hub_and_metrics: tuple[Hub, Metrics, Clock],
) -> None:
    """One sweep for every stream: a steady subscriber gets its heartbeat written by the
    hub, with no task involved; one whose socket is backed up gets it through its queue,
    after what was already on its way."""
    hub, metrics, _ = hub_and_metrics
    async with connect(hub, metrics) as steady_one, connect(hub, metrics) as backed_up:
        await steady(steady_one, backed_up)
        await hub.publish(progress(1))
        backed_up.transport.write(json.dumps({"id": "filler", "pad": "x" * (1 << 22)}).encode())
        backed_up.transport.write(b"\n")
        await hub.send_heartbeats()
        assert [f["type"] for f in steady_one.read_now()] == ["progress", "heartbeat"]
        assert steady_one.sent_by_task == []
        frames = await backed_up.read(3)
        assert [f.get("type", f.get("id")) for f in frames] == ["progress", "filler", "heartbeat"]
        assert backed_up.sent_by_task == ["heartbeat"]


async def test_a_heartbeat_round_lets_other_work_run_between_slices(
    hub_and_metrics: tuple[Hub, Metrics, Clock],
) -> None:
    """A round over many streams writes a slice of them, then lets the event loop run
    (live events, requests) before the next slice, instead of holding it for as long as
    thousands of socket writes take. Every stream still gets exactly one heartbeat."""
    hub, metrics, _ = hub_and_metrics
    async with contextlib.AsyncExitStack() as stack:
        peers = [
            await stack.enter_async_context(connect(hub, metrics, f"session-{n:04d}"))
            for n in range(300)
        ]
        await steady(*peers)
        round_of_heartbeats = asyncio.create_task(hub.send_heartbeats())
        await asyncio.sleep(0)  # the round runs until its first pause, then this test
        first_slice = sum(1 for peer in peers if peer.read_now())
        assert 0 < first_slice < len(peers)
        await round_of_heartbeats
        later = [peer.read_now() for peer in peers]
        assert sum(len(frames) for frames in later) == len(peers) - first_slice
        assert all(f["type"] == "heartbeat" for frames in later for f in frames)


def test_a_rounds_heartbeats_are_the_models_json() -> None:
    """The heartbeats of a round are built once and the session id spliced in: the bytes
    are what the model itself dumps, with the round's one timestamp."""
    heartbeat_of = ControlEvent.heartbeats()
    for session_id in ("session-0001", "a_b-C_9" + "x" * 121, "SESSIONIDMARKER"):
        sent = heartbeat_of(session_id)
        timestamp = json.loads(sent.payload)["timestamp"]
        model = HeartbeatEvent(session_id=session_id, timestamp=timestamp)
        assert sent.payload == model.model_dump_json().encode()
        assert sent.type == "heartbeat" and sent.id is None


async def test_the_hub_timer_sends_heartbeats_to_idle_streams() -> None:
    """With ``heartbeat_interval`` set, the hub's one timer keeps every stream beating."""
    metrics = Metrics()
    hub = Hub(MemoryBroker(100, 60.0), queue_size=50, metrics=metrics, heartbeat_interval=0.05)
    await hub.start()
    try:
        async with connect(hub, metrics) as peer:
            frames = await peer.read(2)
            assert [f["type"] for f in frames] == ["heartbeat", "heartbeat"]
            assert all(f["session_id"] == SID for f in frames)
    finally:
        await hub.close()
