"""The live connection (``server/brokers/redis_live.py``) carries a process's appends and
the live events of the sessions it watches, in RESP3. Calls from many tasks each get
their own replies, in order, while live messages arrive between them; an error reply is
an answer; a cancelled call costs its reply and nothing else; a lost connection fails
the calls waiting on it (the broker retries them) and never hands a reply to the wrong
call; a half-open one is dropped by the append that waited on it; a refused SUBSCRIBE
costs only its own channels; a catch-up after a reconnect does not hold up the appends;
and while Redis is down an append gives up within its retry budget. Against a real
``redis-server``."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from server.errors import ServiceUnavailable

from .redis_support import (
    FreezingProxy,
    Node,
    NodeFactory,
    ServerFactory,
    body,
    eventually,
    new_session_id,
    redis_command,
)


async def call(node: Node, *commands: tuple[Any, ...]) -> list[Any]:
    return await node.broker._live.call([hiredis.pack_command(c) for c in commands])


async def client_id(node: Node) -> int:
    (answer,) = await call(node, ("CLIENT", "ID"))
    return int(answer)


async def blocked_clients(raw_redis: Redis) -> bool:
    return int((await raw_redis.info("clients"))["blocked_clients"]) > 0


async def blocked_call(
    node: Node, raw_redis: Redis, *behind: tuple[Any, ...]
) -> tuple[asyncio.Task[Any], str]:
    """A call of a ``BLPOP`` on an empty list (then of ``behind``), returned once Redis
    blocks on it, with the list's key: its reply stays owed until something is pushed."""
    key = f"test-live-{secrets.token_hex(4)}"
    blocked = asyncio.create_task(call(node, ("BLPOP", key, 0), *behind))
    await eventually(lambda: blocked_clients(raw_redis))
    return blocked, key


async def test_calls_from_many_tasks_get_their_own_replies_while_live_messages_arrive(
    make_node: NodeFactory,
) -> None:
    """200 tasks call at once while 100 appends publish to a session this process
    watches, so live messages arrive between the replies on the one connection: every
    call gets its own replies, every event is delivered once and in order, and nothing
    needed a second connection."""
    node = await make_node()
    sid = new_session_id()
    await node.broker.watch(sid)
    first = await client_id(node)

    async def caller(n: int) -> list[Any]:
        return await call(node, ("ECHO", f"{n}-a"), ("CLIENT", "ID"), ("ECHO", f"{n}-b"))

    appends = asyncio.gather(
        *(node.broker.append(sid, "progress", body(n), False) for n in range(100))
    )
    answers, stored = await asyncio.gather(
        asyncio.gather(*(caller(n) for n in range(200))), appends
    )
    assert answers == [[f"{n}-a", first, f"{n}-b"] for n in range(200)]
    assert sorted(event.seq for event in stored) == list(range(1, 101))
    await node.recorder.wait_until(lambda: len(node.recorder.of(sid)) >= 100)
    assert node.recorder.seqs(sid) == list(range(1, 101))
    assert node.broker._live.connections == 1


async def test_a_live_message_that_is_not_utf8_is_ignored_and_the_connection_kept(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Another client of the same Redis publishes bytes that are not UTF-8 on a watched
    session's channel: the message is dropped like any malformed one, and the connection
    (with every append and watched session on it) goes on, with no reconnect."""
    node = await make_node()
    sid = new_session_id()
    await node.broker.watch(sid)
    await raw_redis.publish(node.broker.channel(sid), b"\xff\xfe|not|utf-8")
    await node.broker.append(sid, "progress", body(1), False)
    await node.recorder.wait_until(lambda: len(node.recorder.of(sid)) >= 1)
    assert node.recorder.seqs(sid) == [1]
    assert node.broker._live.connections == 1


async def test_an_error_reply_is_an_answer_and_the_connection_stays_in_step(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    node = await make_node()
    key = f"test-live-{secrets.token_hex(4)}"
    await raw_redis.set(key, "not a list")
    ok, refused, echoed = await call(node, ("PING",), ("LPUSH", key, "x"), ("ECHO", "next"))
    assert (ok, echoed) == ("PONG", "next")
    assert isinstance(refused, ResponseError) and str(refused).startswith("WRONGTYPE")
    assert await call(node, ("ECHO", "after")) == ["after"]
    await raw_redis.delete(key)


async def test_a_cancelled_call_costs_its_reply_and_nothing_else(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """A call is cancelled while Redis still owes it a reply (a blocking BLPOP): the
    connection is kept (it carries every watched session), the reply is dropped when it
    comes, and the call behind it gets its own."""
    node = await make_node()
    before = await client_id(node)
    blocked, key = await blocked_call(node, raw_redis)
    behind = asyncio.create_task(call(node, ("ECHO", "behind")))
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await raw_redis.rpush(key, "taken")  # serves the BLPOP, whose reply nobody awaits
    assert await behind == ["behind"]
    assert await client_id(node) == before
    assert node.broker._live.connections == 1
    assert await raw_redis.exists(key) == 0


async def test_a_killed_connection_fails_the_calls_waiting_and_the_next_call_gets_a_new_one(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Redis drops the connection (``CLIENT KILL``, as a restart or a network fault would):
    the call waiting on it fails with a connection error (the broker retries those), and
    the next call is answered on a new connection."""
    node = await make_node()
    before = await client_id(node)
    blocked, _ = await blocked_call(node, raw_redis, ("ECHO", "x"), ("PING",))
    await raw_redis.client_kill_filter(_id=str(before))
    with pytest.raises(RedisConnectionError):
        await blocked
    assert await client_id(node) != before
    assert node.broker._live.connections == 2


async def test_close_fails_calls_still_waiting_and_refuses_new_ones(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    node = await make_node()
    blocked, _ = await blocked_call(node, raw_redis)
    await node.broker.close()
    with pytest.raises(RedisConnectionError):
        await blocked
    with pytest.raises(RedisConnectionError):
        await call(node, ("PING",))


async def test_an_append_on_a_half_open_connection_is_retried_on_a_new_one(
    make_node: NodeFactory, redis_url: str, raw_redis: Redis
) -> None:
    """The connection stays open but carries nothing more (a proxy froze it). The silence
    watch would take two ``idle_ping``s (here a minute) to notice; the append gives up on
    it after its ``op_timeout``, drops it, and is stored once, on a new connection."""
    proxy = await FreezingProxy.start(redis_url)
    try:
        node = await make_node(proxy.url(redis_url), op_timeout=0.3, idle_ping=30.0)
        sid = new_session_id()
        await node.broker.append(sid, "progress", body(1), False)
        await proxy.freeze()
        stored = await node.broker.append(sid, "progress", body(2), False)
        assert stored.seq == 2
        assert await raw_redis.xlen(node.broker._stream_key(sid)) == 2
        assert node.broker._live.connections == 2
    finally:
        await proxy.close()


async def test_a_refused_subscribe_is_never_taken_for_an_appends_reply(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """An ACL user may publish to one session's channel but not subscribe to another's.
    The refused SUBSCRIBE's error comes back among the appends' replies on the one
    connection: the watch fails, and every append still gets its own reply (stored once,
    in order), none of them that error."""
    server = own_redis()
    prefix = f"test-{secrets.token_hex(4)}"
    allowed = new_session_id()
    admin = Redis.from_url(server.url, decode_responses=True)
    try:
        await redis_command(
            admin,
            *("ACL", "SETUSER", "narrow", "reset", "on", ">pw", f"~{prefix}:*"),
            *(f"&{prefix}:{{{allowed}}}:live", "+@all"),
        )
    finally:
        await admin.aclose()
    url = server.url.replace("redis://", "redis://narrow:pw@")
    node = await make_node(url, key_prefix=prefix, watch_timeout=0.5)
    await node.broker.watch(allowed)

    async def appends() -> list[int]:
        return [
            (await node.broker.append(allowed, "progress", body(n), False)).seq
            for n in range(1, 41)
        ]

    forbidden = new_session_id()
    watching = asyncio.create_task(node.broker.watch(forbidden))
    assert await appends() == list(range(1, 41))
    with pytest.raises(ServiceUnavailable):
        await watching
    await node.broker.unwatch(forbidden)
    await node.recorder.wait_until(lambda: len(node.recorder.of(allowed)) >= 40)
    assert node.recorder.seqs(allowed) == list(range(1, 41))
    assert [e.seq for e in (await node.broker.read(allowed, None)).events] == list(range(1, 41))


async def test_appends_go_on_while_a_session_is_caught_up_after_a_reconnect(
    make_node: NodeFactory, raw_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection comes back after events were stored without it: the session's
    catch-up read runs beside the reader, so this process's appends are answered while it
    is held; the live events that arrive meanwhile are held back, and the listener gets
    every event once, in order."""
    a, b = await make_node(), await make_node()
    sid, other = new_session_id(), new_session_id()
    await b.broker.watch(sid)
    for n in (1, 2):
        await a.broker.append(sid, "progress", body(n), False)
    await b.recorder.wait_until(lambda: b.recorder.seqs(sid) == [1, 2])

    live = b.broker._live
    connect, read = live._connect, live._read
    reconnecting, reading = asyncio.Event(), asyncio.Event()
    release_connect, release_read = asyncio.Event(), asyncio.Event()

    async def held_connect() -> Any:
        reconnecting.set()
        await release_connect.wait()
        return await connect()

    async def held_read(session_id: str, after: Any) -> Any:
        reading.set()
        await release_read.wait()
        return await read(session_id, after)

    monkeypatch.setattr(live, "_connect", held_connect)
    monkeypatch.setattr(live, "_read", held_read)
    await raw_redis.client_kill_filter(_id=str(await client_id(b)))
    async with asyncio.timeout(5):
        await reconnecting.wait()
    for n in (3, 4):  # stored while b is away: caught up
        await a.broker.append(sid, "progress", body(n), False)
    release_connect.set()
    async with asyncio.timeout(5):
        await reading.wait()
    for n in (5, 6):  # live while the catch-up is held: held back
        await a.broker.append(sid, "progress", body(n), False)
    stored = await b.broker.append(other, "progress", body(1), False)  # answered meanwhile
    assert stored.seq == 1
    assert b.recorder.seqs(sid) == [1, 2]
    release_read.set()
    await b.recorder.wait_until(lambda: len(b.recorder.of(sid)) >= 6)
    assert b.recorder.seqs(sid) == [1, 2, 3, 4, 5, 6]


async def test_one_forbidden_channel_does_not_cost_the_others_their_subscription(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """An operator narrows the ACL user's channels while the process watches two
    sessions: Redis drops the connection, and the reader's SUBSCRIBE of both channels
    is refused whole. Each channel is then subscribed on its own, so the session still
    allowed gets its live events again."""
    server = own_redis()
    prefix = f"test-{secrets.token_hex(4)}"
    allowed, narrowed = new_session_id(), new_session_id()
    admin = Redis.from_url(server.url, decode_responses=True)
    try:
        user = ("ACL", "SETUSER", "narrow", "on", ">pw", f"~{prefix}:*", "+@all")
        await redis_command(admin, *user, f"&{prefix}:*")
        a = await make_node(server.url, key_prefix=prefix)  # the default user: every channel
        b = await make_node(server.url.replace("redis://", "redis://narrow:pw@"), key_prefix=prefix)
        for session_id in (allowed, narrowed):
            await b.broker.watch(session_id)
            await a.broker.append(session_id, "progress", body(1), False)
        await b.recorder.wait_until(lambda: len(b.recorder.events) == 2)
        await redis_command(admin, *user, "resetchannels", f"&{prefix}:{{{allowed}}}:live")
        with contextlib.suppress(ResponseError):  # Redis may have dropped it already
            await redis_command(admin, "CLIENT", "KILL", "USER", "narrow")
        await eventually(lambda: b.broker._live.connections >= 2)
        await a.broker.append(allowed, "progress", body(2), False)
        await b.recorder.wait_until(lambda: b.recorder.seqs(allowed) == [1, 2])
    finally:
        await admin.aclose()


async def test_while_redis_is_down_an_append_fails_within_its_retry_budget(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """Redis stops: an append answers ``ServiceUnavailable`` once its retry budget is
    spent, without waiting out ``op_timeout`` for a connection that cannot come; once
    Redis is back, appends are stored again."""
    server = own_redis()
    op_timeout = 5.0
    node = await make_node(server.url, retry_budget=0.3, op_timeout=op_timeout)
    sid = new_session_id()
    await node.broker.append(sid, "progress", body(1), False)
    server.stop()
    loop = asyncio.get_running_loop()
    for _ in range(2):  # the first may meet the dropped connection, the second the refusal
        started = loop.time()
        with pytest.raises(ServiceUnavailable):
            await node.broker.append(sid, "progress", body(2), False)
        assert loop.time() - started < op_timeout
    server.start()

    async def stored() -> bool:
        with contextlib.suppress(ServiceUnavailable):
            await node.broker.append(sid, "progress", body(3), False)
            return True
        return False

    await eventually(stored, timeout=10)
