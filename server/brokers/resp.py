"""A Redis connection spoken to directly: commands packed and replies parsed by hiredis.

The broker's busiest connection, the live connection its appends are written on
and every live event arrives on, is read this way, and so are the lease calls that
cover every session the process streams. redis-py opens the connection (so the
URL's TLS, user, password and database are honoured) and we then write and read its
socket ourselves. Measured per reply on a pub/sub connection: ``PubSub.get_message``
about 25 µs and ``Connection.read_response`` about 15 µs, for the checks, timeouts,
retry wrappers and push-message hooks redis-py runs on every call; hiredis parses
one in about 1 µs. The live connection speaks RESP3 and the pool RESP2 (see
``RedisBroker._make_client``); hiredis reads either, and returns RESP3's push
replies as ``hiredis.PushNotification``.

This reaches into a redis-py connection for its ``asyncio`` streams, which redis-py
keeps in private attributes; :class:`RespStream` checks for them and fails at once,
with a clear error, on a redis-py that no longer has them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Errors after which the same call may succeed on another attempt.
TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)
# Everything a Redis call may raise that is the store's fault, not ours.
FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, RedisError)

# What a caller is told while Redis cannot be reached or refuses (why goes to the log).
UNAVAILABLE_MESSAGE = "The event store is unavailable; try again shortly."


def error_code(error: BaseException) -> str:
    """The error's class and Redis's error code ("ResponseError OOM"): never its text,
    which may name keys."""
    code = str(error).split(" ", 1)[0][:32] if isinstance(error, ResponseError) else ""
    return f"{type(error).__name__} {code}".rstrip()


_MORE = object()  # hiredis's answer when no whole reply is buffered yet

# One command and its arguments. (hiredis's stub types pack_command's argument as a
# tuple of one item.)
Command = tuple[Any, ...]


class RespStream:
    """One connection taken from a redis-py ``pool``; given back by :meth:`release` (open,
    for redis-py's next call) or :meth:`close`.

    Error replies are returned as :class:`ResponseError` values, not raised, so one
    refused command among many written together does not hide the others' replies.
    """

    def __init__(self, pool: Any, connection: Any) -> None:
        reader = getattr(connection, "_reader", None)
        writer = getattr(connection, "_writer", None)
        if not isinstance(reader, asyncio.StreamReader) or not isinstance(
            writer, asyncio.StreamWriter
        ):
            raise RuntimeError(
                "this redis-py's connections do not keep asyncio streams in _reader and "
                "_writer; server/brokers/resp.py needs them"
            )
        self._pool = pool
        self._connection = connection  # redis-py leaves Connection untyped
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader(
            encoding="utf-8",
            # What this server writes is UTF-8; bytes that are not (a message another
            # client published on a channel of ours) decode with U+FFFD, rather than
            # failing the whole connection. Such a message is then taken as any other
            # on the channel: dropped if malformed (Redis and its channels are trusted).
            errors="replace",
            notEnoughData=_MORE,
            replyError=ResponseError,
            protocolError=RedisConnectionError,  # a garbled stream is a lost connection
        )

    @classmethod
    async def open(cls, pool: Any) -> RespStream:
        """A connected connection from ``pool`` (it connects and authenticates)."""
        connection = await pool.get_connection()
        try:
            return cls(pool, connection)
        except BaseException:
            await pool.release(connection)
            raise

    @property
    def is_open(self) -> bool:
        return not self._writer.is_closing()

    def write(self, packed: Iterable[bytes]) -> None:
        """Queue already packed commands (``hiredis.pack_command``) for the socket."""
        self._writer.writelines(packed)

    def send(self, *commands: Command) -> None:
        self.write([hiredis.pack_command(command) for command in commands])

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark."""
        await self._writer.drain()

    async def call(self, packed: list[bytes]) -> list[Any]:
        """Write the packed commands and read their replies, in order."""
        self.write(packed)
        await self.drain()
        return [await self.read() for _ in packed]

    async def read(self) -> Any:
        """The next reply; raises ``RedisConnectionError`` once Redis has closed it."""
        reply = self._parser.gets()
        while reply is _MORE:
            data = await self._reader.read(65536)
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            self._parser.feed(data)
            reply = self._parser.gets()
        return reply

    def abort(self) -> None:
        """Drop the connection at once; a pending :meth:`read` then fails."""
        self._writer.transport.abort()

    async def release(self) -> None:
        """Give the connection back to its pool open, for redis-py's next call. Only when
        every reply was read: otherwise it is closed (see :meth:`close`)."""
        if self._parser.has_data() or not self.is_open:
            await self.close()
        else:
            await self._pool.release(self._connection)

    async def close(self) -> None:
        """Close the socket and give the connection back to its pool (which opens a new
        one when it is next taken)."""
        with contextlib.suppress(Exception):
            await self._connection.disconnect()
        await self._pool.release(self._connection)
