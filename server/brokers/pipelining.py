"""One Redis connection on which calls are written as they come and answered in order.

Redis answers the commands of one connection in the order it received them, so a
caller need not wait for the answers of the calls before its own: it writes its
commands at once and a reader task hands each answer to the call it belongs to. Many
batches of appends can then be on their way on one connection, instead of each taking
a pooled connection through redis-py's client, which checks it and records metrics on
every call: measured, that was half of what a lone append cost the server.

The connection comes from the client's pool (so it has the URL's TLS, password and
database), is kept, and is written and read directly (:mod:`.resp`). When it fails, or
a call is cancelled midway (its answers could then not be told apart from the next
call's), the connection is dropped, every call still waiting on it fails with a
connection error (the broker retries those), and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from .resp import RespStream


@dataclass(slots=True)
class _Life:
    """One connection from the pool, and the calls waiting for its answers, oldest first."""

    stream: RespStream
    waiting: deque[asyncio.Future[Any]] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None


class PipelinedConnection:
    """Calls written on one connection taken from ``pool``, answered in order."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._life: _Life | None = None
        self._opening = asyncio.Lock()  # one connection opened at a time
        self._closed = False

    async def call(self, packed: list[bytes]) -> list[Any]:
        """Write the packed commands and return their answers, in order; an error reply
        is returned as its ``ResponseError``, not raised."""
        life = await self._open()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in packed]
        # No await between queueing the futures and writing: the order of the queue is
        # the order on the wire, whichever task writes next.
        life.waiting.extend(futures)
        try:
            life.stream.write(packed)
            await life.stream.drain()
            return [await future for future in futures]
        except BaseException:
            self._drop(life)
            raise

    async def _open(self) -> _Life:
        life = self._life
        if life is not None and life.stream.is_open:
            return life
        async with self._opening:
            if self._closed:
                raise RedisConnectionError("the append connection is closed")
            life = self._life
            if life is not None and life.stream.is_open:
                return life
            if life is not None:
                self._drop(life)
            stream = await RespStream.open(self._pool)
            if self._closed:  # closed while the pool was connecting
                await stream.close()
                raise RedisConnectionError("the append connection is closed")
            life = self._life = _Life(stream)
            life.reader = asyncio.create_task(self._read(life), name="redis-append-reader")
            return life

    async def _read(self, life: _Life) -> None:
        """Hand each answer to the oldest waiting call, until the connection fails or is
        dropped; then fail whatever still waits, and give the connection back."""
        error: BaseException = RedisConnectionError("the append connection was dropped")
        try:
            while True:
                answer = await life.stream.read()  # an error reply is an answer too
                if not life.waiting:  # nothing was asked: the stream cannot be trusted
                    raise RedisConnectionError("unexpected answer on the append connection")
                future = life.waiting.popleft()
                if not future.done():  # its caller may have been cancelled
                    future.set_result(answer)
        except asyncio.CancelledError:
            pass  # dropped
        except Exception as failure:
            error = failure
        finally:
            if self._life is life:
                self._life = None
            while life.waiting:
                future = life.waiting.popleft()
                if not future.done():
                    future.set_exception(error)
            with contextlib.suppress(Exception):
                await life.stream.close()

    def _drop(self, life: _Life) -> None:
        if self._life is life:
            self._life = None
        if life.reader is not None:
            life.reader.cancel()

    async def close(self) -> None:
        self._closed = True
        life = self._life
        if life is not None:
            self._drop(life)
            if life.reader is not None:
                await asyncio.wait({life.reader})
