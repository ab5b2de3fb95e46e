"""Workflow leases in the brokers (``claim(lease=)``, ``renew_leases``, ``release_lease``,
``lease_states``): what each state means, on a real Redis shared by several broker
instances ("processes"), and the trivial in-memory version."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from server.brokers.base import IdempotencyKey, Lease
from server.brokers.memory import MemoryBroker
from server.errors import ServiceUnavailable

from .redis_support import (
    TIMEOUT,
    LoseFirstAnswer,
    NodeFactory,
    ServerFactory,
    body,
    eventually,
    new_session_id,
    out_of_memory,
    redis_command,
)

SHORT = 0.3  # seconds: a lease that lapses within a test


async def test_a_lease_is_taken_with_the_claim_and_held_by_one_owner(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """A claim with a lease takes it in the same step: the session reads ``held`` from
    every process at once; a second claim (with its own lease) fails and changes nothing."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    assert await a.broker.claim(sid, Lease("owner-a", 30))
    assert await b.broker.lease_states([sid]) == {sid: "held"}
    assert not await b.broker.claim(sid, Lease("owner-b", 30))
    assert await raw_redis.get(a.broker._lease_key(sid)) == "owner-a"
    assert 0 < await raw_redis.pttl(a.broker._lease_key(sid)) <= 30_000


async def test_a_lease_that_is_not_renewed_is_lost(make_node: NodeFactory) -> None:
    """``lease.ttl`` after the claim, with no renewal and no final event, the session reads
    ``lost`` everywhere: its workflow's process is gone."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    assert await a.broker.claim(sid, Lease("owner-a", SHORT))
    await a.broker.append(sid, "progress", body(1), False)

    async def lost() -> bool:
        return await b.broker.lease_states([sid]) == {sid: "lost"}

    await eventually(lost)


async def test_renewal_keeps_a_lease_past_its_ttl_and_takes_a_lapsed_one_again(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Renewing pushes the lease's expiry back to its ttl; a lease that lapsed (its owner
    could not renew in time) is taken again by its owner's next renewal."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    lease = Lease("owner-a", 30)
    assert await a.broker.claim(sid, Lease("owner-a", SHORT))
    assert await a.broker.renew_leases([sid], lease) == {sid}
    assert 1000 < await raw_redis.pttl(a.broker._lease_key(sid)) <= 30_000

    await raw_redis.delete(a.broker._lease_key(sid))  # it lapsed
    assert await b.broker.lease_states([sid]) == {sid: "lost"}
    assert await a.broker.renew_leases([sid], lease) == {sid}
    assert await b.broker.lease_states([sid]) == {sid: "held"}


async def test_renewal_leaves_ended_sessions_and_other_owners_alone(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """An ended session's lease is not taken again, nor one that another owner holds."""
    a = await make_node()
    ended, other = new_session_id(), new_session_id()
    for sid in (ended, other):
        assert await a.broker.claim(sid, Lease("owner-a", 30))
    await a.broker.append(ended, "complete", body(1), True)
    await raw_redis.delete(a.broker._lease_key(ended))
    await raw_redis.set(a.broker._lease_key(other), "owner-b")

    assert await a.broker.renew_leases([ended, other], Lease("owner-a", 30)) == set()
    assert await raw_redis.exists(a.broker._lease_key(ended)) == 0
    assert await raw_redis.get(a.broker._lease_key(other)) == "owner-b"


async def test_a_claim_nobody_acted_on_is_never_another_processs_to_claim(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """A session claimed with a lease and nothing stored in it is claimed by no other
    process, its lease held or lapsed: its claimer may have stalled between its claim and
    its first event, and would then run the session alongside. Once the lease has lapsed,
    not by its claimer either (a lease monitor may be ending it)."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    assert await a.broker.claim(sid, Lease("owner-a", 30))
    assert not await b.broker.claim(sid, Lease("owner-b", 30))
    assert not await b.broker.claim(sid)  # without a lease, never
    await raw_redis.delete(a.broker._lease_key(sid))  # it lapsed
    assert not await b.broker.claim(sid, Lease("owner-b", 30))
    assert not await a.broker.claim(sid, Lease("owner-a", 30))
    assert await b.broker.lease_states([sid]) == {sid: "lost"}


async def test_a_process_claims_again_a_claim_of_its_own_that_nobody_acted_on(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Its lease still held by the same owner (the process whose claim's answers were all
    lost), the session is that owner's to claim again, in the same epoch, with its lease
    taken for a new ttl; another owner's is not."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    assert await a.broker.claim(sid, Lease("owner-a", 5))
    epoch = (await a.broker.info(sid)).epoch  # type: ignore[union-attr]
    assert not await b.broker.claim(sid, Lease("owner-b", 30))
    assert await a.broker.claim(sid, Lease("owner-a", 30))
    assert await raw_redis.get(a.broker._lease_key(sid)) == "owner-a"
    assert 5_000 < await raw_redis.pttl(a.broker._lease_key(sid)) <= 30_000
    assert (await a.broker.info(sid)).epoch == epoch  # type: ignore[union-attr]


async def test_a_claim_with_events_an_end_or_no_lease_is_never_claimed_again(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Once something is stored in a claimed session (its workflow runs), once it has ended,
    or when it was claimed without a lease (nothing would ever say it was abandoned), no
    claim takes it, even with its lease gone."""
    a, b = await make_node(), await make_node()
    running, ended, unleased = new_session_id(), new_session_id(), new_session_id()
    assert await a.broker.claim(running, Lease("owner-a", 30))
    await a.broker.append(running, "progress", body(1), False)
    assert await a.broker.claim(ended, Lease("owner-a", 30))
    await a.broker.append(ended, "complete", body(1), True)
    assert await a.broker.claim(unleased)
    for sid in (running, ended, unleased):
        await raw_redis.delete(a.broker._lease_key(sid))
        assert not await b.broker.claim(sid, Lease("owner-b", 30)), sid
        assert not await a.broker.claim(sid, Lease("owner-a", 30)), sid


async def test_a_claim_whose_answer_was_lost_takes_its_lease_again(
    make_node: NodeFactory, raw_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim retried after its answer was lost finds its own first attempt; if the lease
    that attempt took has lapsed meanwhile (a lease ttl shorter than the retries), the retry
    takes it again, so the running workflow is not taken for abandoned."""
    a = await make_node()
    sid = new_session_id()

    async def lease_lapses() -> None:
        await raw_redis.delete(a.broker._lease_key(sid))

    lossy = LoseFirstAnswer(a.broker._claim_script, meanwhile=lease_lapses)
    monkeypatch.setattr(a.broker, "_claim_script", lossy)
    assert await a.broker.claim(sid, Lease("owner-a", 30))
    assert lossy.calls == 2
    assert await raw_redis.get(a.broker._lease_key(sid)) == "owner-a"
    assert await a.broker.lease_states([sid]) == {sid: "held"}


async def test_release_only_by_the_owner(make_node: NodeFactory) -> None:
    """``release_lease`` by another owner changes nothing; by the owner it drops the lease
    (the owner stores its final event first, so the session then reads ``ended``)."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    assert await a.broker.claim(sid, Lease("owner-a", 30))
    await b.broker.release_lease(sid, "owner-b")
    assert await b.broker.lease_states([sid]) == {sid: "held"}
    await a.broker.append(sid, "complete", body(1), True)
    assert await b.broker.lease_states([sid]) == {sid: "ended"}  # final first: never lost
    await a.broker.release_lease(sid, "owner-a")
    assert await b.broker.lease_states([sid]) == {sid: "ended"}


async def test_lease_states_of_many_sessions_in_one_call(make_node: NodeFactory) -> None:
    """One call reports every session: held, lost, ended, none (published into without a
    workflow, or claimed without a lease) and gone (no stream at all). The broker asks
    Redis a hundred sessions at a time: the sessions of interest sit in different
    hundreds, and each gets its own answer."""
    a = await make_node()
    held, lost, ended, published, unleased, gone = (new_session_id() for _ in range(6))
    assert await a.broker.claim(held, Lease("owner-a", 30))
    assert await a.broker.claim(lost, Lease("owner-a", 30))
    await a.broker.release_lease(lost, "owner-a")  # as if it had lapsed
    assert await a.broker.claim(ended, Lease("owner-a", 30))
    await a.broker.append(ended, "complete", body(1), True)
    await a.broker.append(published, "progress", body(1), False)
    assert await a.broker.claim(unleased)
    many = [new_session_id() for _ in range(300)]
    asked = many[:]
    for n, session_id in enumerate((held, lost, ended, published, unleased, gone)):
        asked.insert(n * 61, session_id)  # positions 0, 61, ..., 305: in four hundreds
    states = await a.broker.lease_states(asked)
    assert list(states) == asked
    assert [states[s] for s in (held, lost, ended, published, unleased, gone)] == [
        "held",
        "lost",
        "ended",
        "none",
        "none",
        "gone",
    ]
    assert {states[s] for s in many} == {"gone"}
    assert await a.broker.lease_states([]) == {}


async def test_a_session_redis_refuses_does_not_fail_the_others_lease_calls(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """One session whose key Redis refuses the scripts for (here its state is a string,
    written by something else) is left out of the answers: the other leases of the
    process are renewed and read, rather than every renewal failing with it and every
    running workflow's lease lapsing. When Redis refuses them all, the store is
    unavailable."""
    a = await make_node()
    lease = Lease("owner-a", 30)
    good, bad = new_session_id(), new_session_id()
    for sid in (good, bad):
        assert await a.broker.claim(sid, lease)
    await raw_redis.set(a.broker._state_key(bad), "not a hash")

    # The refused one is not known to be lost (as under OOM: below).
    assert await a.broker.renew_leases([bad, good], lease) == {bad, good}
    assert await a.broker.lease_states([bad, good]) == {good: "held"}
    with pytest.raises(ServiceUnavailable):
        await a.broker.renew_leases([bad], lease)
    with pytest.raises(ServiceUnavailable):
        await a.broker.lease_states([bad])


async def test_under_oom_a_refused_renewal_is_not_taken_for_a_lost_lease(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """A Redis out of memory refuses the renewals that write (a running workflow's), not
    those that find the lease lost and write nothing: the running one is not known to be
    lost (its owed final event, say, must be kept, not dropped), the lost one is."""
    server = own_redis()
    a = await make_node(server.url)
    lease = Lease("owner-a", 30)
    running, ended = new_session_id(), new_session_id()
    for sid in (running, ended):
        assert await a.broker.claim(sid, lease)
    await a.broker.append(ended, "complete", body(1), True)
    admin = Redis.from_url(server.url)
    try:
        async with out_of_memory(admin):
            assert await a.broker.renew_leases([ended, running], lease) == {running}
    finally:
        await admin.aclose()


async def test_lease_calls_load_their_scripts_again_after_a_script_flush(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """After ``SCRIPT FLUSH`` (as after a restart of Redis), renewals and lease checks load
    their script again and answer as before."""
    a = await make_node()
    sid, other = new_session_id(), new_session_id()
    assert await a.broker.claim(sid, Lease("owner-a", SHORT))
    await raw_redis.script_flush()
    await a.broker.renew_leases([sid], Lease("owner-a", 30))
    assert await raw_redis.pttl(a.broker._lease_key(sid)) > SHORT * 1000  # renewed
    await raw_redis.script_flush()
    assert await a.broker.lease_states([sid, other]) == {sid: "held", other: "gone"}


async def test_a_lease_check_held_past_its_time_out_gives_its_connection_back(
    make_node: NodeFactory, own_redis: ServerFactory
) -> None:
    """Redis holds a lease check past its time-out (``CLIENT PAUSE``): the call fails with
    ``ServiceUnavailable``, and the connection it had taken is not lost to the pool. With
    one pooled connection (the other is kept for appends), every later call would
    otherwise wait for a connection and fail."""
    server = own_redis()
    a = await make_node(server.url, max_connections=2, op_timeout=0.2, retry_budget=0.3)
    admin = Redis.from_url(server.url, decode_responses=True)
    sid = new_session_id()
    try:
        assert await a.broker.claim(sid, Lease("owner-a", 30))
        await redis_command(admin, "CLIENT", "PAUSE", 60_000, "WRITE")
        with pytest.raises(ServiceUnavailable):
            await a.broker.lease_states([sid])
        await redis_command(admin, "CLIENT", "UNPAUSE")
        for _ in range(3):
            assert await a.broker.lease_states([sid]) == {sid: "held"}
            assert (await a.broker.info(sid)) is not None
    finally:
        await admin.aclose()


async def test_a_renewal_does_not_wait_for_the_pool_behind_other_calls(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """With every pooled connection taken by other calls (a storm of replays and claims),
    a renewal still goes through at once on connections of its own, where it used to wait
    in line for the pool (over a second with 3,000 clients reconnecting) while the lease
    ran out under a running workflow."""
    a = await make_node(max_connections=2, op_timeout=0.2, retry_budget=0.3)
    sid = new_session_id()
    lease = Lease("owner-a", 30)
    assert await a.broker.claim(sid, lease)
    client = a.broker._require_client()

    async def hold_a_connection() -> None:
        await client.blpop([f"busy-{sid}"], 30)

    busy = [asyncio.create_task(hold_a_connection()) for _ in range(2)]
    try:
        async with asyncio.timeout(TIMEOUT):
            while not await blocked(raw_redis, 2):
                await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable):
            await a.broker.info(sid)  # the pool is taken
        assert await a.broker.renew_leases([sid], lease) == {sid}
    finally:
        await raw_redis.rpush(f"busy-{sid}", 1, 2)
        await asyncio.gather(*busy)


async def blocked(redis: Redis, count: int) -> bool:
    """``count`` or more clients of this Redis wait in a blocking command."""
    info = await redis.info("clients")
    return int(info["blocked_clients"]) >= count


async def test_a_stream_recreated_under_a_running_workflow_is_leased_again(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """When the store loses a session (Redis restarted empty) while its workflow runs, the
    owner's next renewal takes the lease again (``held``, even before its next event), and
    marks the recreated stream as leased, so that it reads ``lost`` if that owner dies."""
    a, b = await make_node(), await make_node()
    sid = new_session_id()
    lease = Lease("owner-a", 30)
    assert await a.broker.claim(sid, lease)
    await raw_redis.delete(*(a.broker._state_key(sid), a.broker._lease_key(sid)))
    assert await b.broker.lease_states([sid]) == {sid: "gone"}
    await a.broker.renew_leases([sid], lease)
    assert await b.broker.lease_states([sid]) == {sid: "held"}
    await a.broker.append(sid, "progress", body(1), False)  # a new epoch
    await a.broker.renew_leases([sid], lease)
    await raw_redis.delete(a.broker._lease_key(sid))  # then the owner dies
    assert await b.broker.lease_states([sid]) == {sid: "lost"}


async def test_memory_leases_are_held_until_released_and_never_lost() -> None:
    """In memory (one process) a lease is held from the claim until it is released or the
    final event is stored, whatever its ttl; it never reads ``lost``."""
    broker = MemoryBroker(100, 60.0)
    sid, other, published = "session-0001", "session-0002", "session-0003"
    assert await broker.claim(sid, Lease("me", 0.001))
    assert await broker.claim(other, Lease("me", 0.001))
    await broker.append(published, "progress", body(1), False)
    assert await broker.renew_leases([sid, other, published], Lease("me", 0.001)) == {sid, other}
    states = await broker.lease_states([sid, other, published, "session-0004"])
    assert states == {sid: "held", other: "held", published: "none", "session-0004": "gone"}
    await broker.append(sid, "complete", body(1), True)
    await broker.release_lease(other, "someone else")
    assert await broker.lease_states([sid, other]) == {sid: "ended", other: "held"}
    await broker.release_lease(other, "me")
    assert await broker.lease_states([other]) == {other: "none"}


async def test_a_renewal_keeps_a_running_workflows_history_from_expiring(
    make_node: NodeFactory, raw_redis: Redis
) -> None:
    """Agents may stay silent longer than ``session_ttl`` (a short ttl, a slow model):
    each renewal gives the session's state, events and keys ``session_ttl`` again, as an
    append does, so what the workflow published stays replayable while it runs. Once
    the final event is stored, renewals no longer extend it."""
    a = await make_node(session_ttl=60)
    sid = new_session_id()
    lease = Lease("owner-a", 30)
    assert await a.broker.claim(sid, lease)
    await a.broker.append(sid, "progress", body(1), False, IdempotencyKey("k-1", "f"))
    session_keys = (a.broker._state_key(sid), a.broker._stream_key(sid), a.broker._keys_key(sid))
    for key in session_keys:
        await raw_redis.pexpire(key, 1000)  # the ttl nearly spent in silence
    await a.broker.renew_leases([sid], lease)
    for key in session_keys:
        assert 1000 < await raw_redis.pttl(key) <= 60_000

    await a.broker.append(sid, "complete", body(2), True)
    for key in session_keys:
        await raw_redis.pexpire(key, 1000)
    await a.broker.renew_leases([sid], lease)
    for key in session_keys:
        assert 0 < await raw_redis.pttl(key) <= 1000


async def test_memory_sweep_keeps_a_running_workflows_session() -> None:
    """In memory the sweep forgets a session untouched for ``session_ttl`` unless its
    workflow still runs here (its lease is held); released, it goes at the next sweep."""
    now = [0.0]
    broker = MemoryBroker(100, 60.0, clock=lambda: now[0])
    running, idle = "session-0001", "session-0002"
    assert await broker.claim(running, Lease("me", 30))
    await broker.append(running, "progress", body(1), False)
    await broker.append(idle, "progress", body(1), False)
    now[0] += 61
    assert broker.sweep() == 1
    assert await broker.info(idle) is None
    replay = await broker.read(running, None)
    assert [e.seq for e in replay.events] == [1]

    await broker.append(running, "complete", body(2), True)
    await broker.release_lease(running, "me")
    now[0] += 61
    assert broker.sweep() == 1
    assert await broker.info(running) is None

    # Ended by another service's final event, the run stops without releasing its lease:
    # the ended session goes all the same.
    assert await broker.claim(running, Lease("me", 30))
    await broker.append(running, "complete", body(1), True)
    now[0] += 61
    assert broker.sweep() == 1
    assert await broker.info(running) is None
