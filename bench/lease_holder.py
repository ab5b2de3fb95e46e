"""Workflows running in another process: the leases of the ``sessions_held`` rows.

An orchestrator's sessions mostly have a workflow running, and over the Redis
broker every process that streams a session asks Redis about its workflow's lease
every ``lease_check_interval`` (``server/leases.py``). A session with no workflow,
or an ended one, is asked about only every tenth round, so the plain ``sessions``
rows, whose sessions only get published into, leave most of that cost out.

Here the load generator plays the process that runs the workflows: before anyone
subscribes it claims every session with a lease, as a workflow's claim does, and
renews all the leases every third of their lifetime, as ``WorkflowLeases`` does.
The server under test then finds every session ``held``, round after round.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

# The working tree's server, for ours@REV rows too: the key layout is the server's.
from server.brokers.base import Lease
from server.brokers.redis import RedisBroker

# The server's default (server/config.py): how long a lease outlives its last renewal.
LEASE_TTL = 10.0


@contextlib.asynccontextmanager
async def held_leases(
    redis_url: str, session_ids: list[str]
) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Every session claimed with a live lease while the block runs. It gets a function
    that counts the sessions whose lease Redis says is held."""
    broker = RedisBroker(redis_url, buffer_size=100, session_ttl=3600.0)
    await broker.start(lambda event: None)
    lease = Lease(owner=f"bench-{secrets.token_hex(4)}", ttl=LEASE_TTL)
    try:
        for session_id in session_ids:
            if not await broker.claim(session_id, lease):
                raise RuntimeError(f"session {session_id} was already claimed")
        renewing = asyncio.create_task(_renew(broker, session_ids, lease))

        async def count_held() -> int:
            states = await broker.lease_states(session_ids)
            return sum(state == "held" for state in states.values())

        try:
            yield count_held
        finally:
            renewing.cancel()
            await asyncio.wait({renewing})
        # Not released: a released lease on a session with no final event reads as a
        # workflow whose process died, which the server would end. They lapse after
        # LEASE_TTL, once the row's server has stopped.
    finally:
        await broker.close()


async def _renew(broker: RedisBroker, session_ids: list[str], lease: Lease) -> None:
    while True:
        await asyncio.sleep(lease.ttl / 3)
        await broker.renew_leases(session_ids, lease)
