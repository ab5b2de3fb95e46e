"""The live connection's silence watch (``server/brokers/liveness.py``), against a real
Redis: a quiet connection that answers its pings is kept, and an unanswered ping ends
the connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.brokers.liveness import SilenceWatch
from server.brokers.resp import RespStream

from .redis_support import FreezingProxy, NodeFactory, new_session_id

INTERVAL = 0.05
# Time the scenarios let pass (not a wait for something to happen): many intervals.
QUIET = INTERVAL * 10


@contextlib.asynccontextmanager
async def open_stream(url: str) -> AsyncIterator[RespStream]:
    """A connection to ``url`` read directly, as the broker's pub/sub reader reads it."""
    client = Redis.from_url(url, protocol=2)
    opened = await RespStream.open(client.connection_pool)
    try:
        yield opened
    finally:
        await opened.close()
        await client.aclose()


def ping(stream: RespStream) -> Callable[[], None]:
    return lambda: stream.send(("PING",))


@pytest.fixture
async def stream(redis_url: str) -> AsyncIterator[RespStream]:
    async with open_stream(redis_url) as opened:
        yield opened


async def test_a_quiet_pubsub_connection_that_answers_its_pings_is_kept(
    make_node: NodeFactory,
) -> None:
    """Nothing published for ten ``idle_ping``s: the reader pings, Redis answers, and the
    connection is kept (not replaced over and over); live events still arrive on it."""
    a = await make_node()
    b = await make_node(idle_ping=INTERVAL)
    sid = new_session_id()
    await b.broker.watch(sid)
    await a.broker.append(sid, "progress", json.dumps({"n": 1}), False)
    await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1])
    await asyncio.sleep(QUIET)
    await a.broker.append(sid, "progress", json.dumps({"n": 2}), False)
    await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2])
    assert b.broker._live.connections == 1


async def test_an_unanswered_ping_ends_the_pending_read(redis_url: str) -> None:
    """A half-open connection (a proxy that froze it): the watch pings, nothing comes
    back, and the read that was waiting fails, so the reader can connect again."""
    proxy = await FreezingProxy.start(redis_url)
    try:
        async with open_stream(proxy.url(redis_url)) as opened:
            await proxy.freeze()
            watch = SilenceWatch(opened, INTERVAL, ping(opened))
            try:
                with pytest.raises(RedisConnectionError):
                    async with asyncio.timeout(QUIET):
                        await opened.read()
                assert watch.silent
            finally:
                watch.stop()
    finally:
        await proxy.close()
