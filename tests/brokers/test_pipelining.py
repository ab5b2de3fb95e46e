"""The connection the Redis broker writes its appends on: calls from many tasks share it,
each gets its own answers in order, and a failure or a cancelled call costs a reconnect,
never an answer handed to the wrong call. Against a real ``redis-server``."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from server.brokers.pipelining import PipelinedConnection

from .redis_support import eventually


def packed(*commands: tuple[Any, ...]) -> list[bytes]:
    return [hiredis.pack_command(command) for command in commands]


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[BlockingConnectionPool]:
    pool = BlockingConnectionPool.from_url(
        redis_url, max_connections=4, decode_responses=True, protocol=2
    )
    yield pool
    await pool.aclose()


@pytest.fixture
async def pipe(pool: BlockingConnectionPool) -> AsyncIterator[PipelinedConnection]:
    connection = PipelinedConnection(pool)
    yield connection
    await connection.close()


async def blocked_clients(raw_redis: Redis) -> bool:
    return int((await raw_redis.info("clients"))["blocked_clients"]) > 0


async def client_id(pipe: PipelinedConnection) -> int:
    (answer,) = await pipe.call(packed(("CLIENT", "ID")))
    return int(answer)


async def test_calls_from_many_tasks_get_their_own_answers_on_one_connection(
    pipe: PipelinedConnection,
) -> None:
    """200 tasks write at once, without waiting for each other's answers; each gets the
    answers to its own commands, in order, and all of them went over one connection."""
    first = await client_id(pipe)

    async def caller(n: int) -> list[object]:
        return await pipe.call(packed(("ECHO", f"{n}-a"), ("CLIENT", "ID"), ("ECHO", f"{n}-b")))

    answers = await asyncio.gather(*(caller(n) for n in range(200)))
    assert answers == [[f"{n}-a", first, f"{n}-b"] for n in range(200)]


async def test_an_error_reply_is_an_answer_and_the_connection_stays_in_step(
    pipe: PipelinedConnection, raw_redis: Redis
) -> None:
    key = f"test-pipe-{secrets.token_hex(4)}"
    await raw_redis.set(key, "not a list")
    ok, refused, echoed = await pipe.call(packed(("PING",), ("LPUSH", key, "x"), ("ECHO", "next")))
    assert (ok, echoed) == ("PONG", "next")
    assert isinstance(refused, ResponseError) and str(refused).startswith("WRONGTYPE")
    assert await pipe.call(packed(("ECHO", "after"))) == ["after"]
    await raw_redis.delete(key)


async def test_a_cancelled_call_drops_the_connection_and_fails_those_behind_it(
    pipe: PipelinedConnection, raw_redis: Redis
) -> None:
    """A call is cancelled while Redis still owes it an answer (a blocking BLPOP): the
    answers due can no longer be matched to their calls, so the connection is dropped, the
    call queued behind it fails with a connection error (the broker retries it), and the
    next call is answered on a new connection."""
    before = await client_id(pipe)
    key = f"test-pipe-{secrets.token_hex(4)}"
    blocked = asyncio.create_task(pipe.call(packed(("BLPOP", key, 0))))
    await eventually(lambda: blocked_clients(raw_redis))
    behind = asyncio.create_task(pipe.call(packed(("ECHO", "behind"))))
    await eventually(lambda: pipe._life is not None and len(pipe._life.waiting) == 2)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    with pytest.raises(RedisConnectionError):
        await behind
    assert await client_id(pipe) != before
    await raw_redis.rpush(key, "late")  # no one takes it: the blocked connection is gone
    assert await raw_redis.lrange(key, 0, -1) == ["late"]
    await raw_redis.delete(key)


async def test_a_killed_connection_is_replaced(pipe: PipelinedConnection, raw_redis: Redis) -> None:
    """Redis drops the connection (``CLIENT KILL``, as a restart or a network fault would):
    at most one call fails with a connection error, and the next one gets a new connection."""
    before = await client_id(pipe)
    await raw_redis.client_kill_filter(_id=str(before))
    with contextlib.suppress(RedisConnectionError):
        await pipe.call(packed(("PING",)))
    assert await client_id(pipe) != before


async def test_close_fails_calls_still_waiting_and_refuses_new_ones(
    pool: BlockingConnectionPool, raw_redis: Redis
) -> None:
    pipe = PipelinedConnection(pool)
    key = f"test-pipe-{secrets.token_hex(4)}"
    blocked = asyncio.create_task(pipe.call(packed(("BLPOP", key, 0))))
    await eventually(lambda: blocked_clients(raw_redis))
    await pipe.close()
    with pytest.raises(RedisConnectionError):
        await blocked
    with pytest.raises(RedisConnectionError):
        await pipe.call(packed(("PING",)))
