"""The Lua scripts of the Redis broker: each is one atomic step on one session's keys.

Every write the broker makes is one of these scripts, so the next ``seq`` is
assigned, the entry stored, the stream trimmed, the expiry refreshed and the live
message published as one step, whichever process runs it. The keys they touch are
listed in :mod:`.redis`; each script names its ``KEYS`` and ``ARGV`` above it.
"""

from __future__ import annotations

from .base import LeaseState

# KEYS: state, stream, nonces, keys, nonce seqs, earlier nonce seqs. ARGV: type, final
# (0|1), body, maxlen, ttl_ms, fresh epoch, channel, nonce, retry window ms, retry (0|1),
# idempotency key ('' for none), its fingerprint, then two positions (epoch, seq) this
# process has seen the stream reach: the last it stored and the last it delivered (('',
# 0) for none). Returns:
#   {1, epoch, seq, rewound}  stored; rewound is the id of the position seen when the
#                             stream took a new epoch for lost writes (below), else ''
#   {0, final_id}             the session has ended
#   {2, epoch, seq}           the key was stored before: nothing stored now
#   {3}                       the key was stored before, with another fingerprint
#
# Every append leaves its nonce -> seq in the nonce seqs hash for at least the retry
# window, where a retry finds it in one step however many appends came in between. The
# hash is renamed to the earlier nonce seqs (which it replaces) once it is a window old,
# and a new one started: a nonce lives one to two windows, with nothing to prune. Its
# age is read from its expiry, set once when it begins: Redis's clock, not a caller's. (A
# retry used to scan a stream of the window's nonces: with a session taking thousands
# of appends a second, each retried batch held Redis up for seconds, for every process.
# That stream, "nonces", is no longer written; a new life of the stream deletes it.)
#
# A publisher's idempotency key is a field of the state hash, "k:<key>" = "<seq>:<fp>",
# so it lives and dies with the session; the keys list holds them oldest first, and the
# oldest goes once there are more than maxlen. 'keyed' marks a state with any: the list's
# expiry then follows the state's.
#
# A stream behind what this process has seen of it lost writes: Redis came back from an
# older snapshot, or failed over to a replica that lagged. Its next seqs would name
# events other than those its subscribers have; it takes a fresh epoch instead (keeping
# its entries, now under the new epoch), so that every subscriber gets a gap notice.
APPEND_LUA = """
local state, stream, nonces, keys = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local seqs, earlier = KEYS[5], KEYS[6]
local key = ARGV[11]
local st = redis.call('HMGET', state, 'epoch', 'final', 'keyed', 'k:' .. key, 'seq')
local epoch = st[1]
local rewound = ''
if epoch and ARGV[10] == '1' then
  -- A retry: the first attempt may have been stored and its answer lost.
  local first = redis.call('HGET', seqs, ARGV[8]) or redis.call('HGET', earlier, ARGV[8])
  if first then
    return {1, epoch, tonumber(first), ''}
  end
end
if not epoch then
  -- A new life of the stream: drop any orphan entries, nonces and keys of an earlier one.
  redis.call('DEL', stream, nonces, seqs, earlier, keys)
  epoch = ARGV[6]
  redis.call('HSET', state, 'epoch', epoch, 'seq', 0)
else
  if key ~= '' and st[4] then
    local seq, fingerprint = string.match(st[4], '^(%d+):(.*)$')
    if fingerprint ~= ARGV[12] then
      return {3}
    end
    return {2, epoch, tonumber(seq)}
  end
  if st[2] then
    return {0, st[2]}
  end
  for i = 13, 15, 2 do
    if rewound == '' and epoch == ARGV[i] and tonumber(st[5]) < tonumber(ARGV[i + 1]) then
      rewound = epoch .. '-' .. ARGV[i + 1]
    end
  end
  if rewound ~= '' then
    epoch = ARGV[6]
    redis.call('HSET', state, 'epoch', epoch)
  end
end
local seq = redis.call('HINCRBY', state, 'seq', 1)
redis.call('XADD', stream, 'MAXLEN', '=', ARGV[4], seq .. '-0',
           't', ARGV[1], 'f', ARGV[2], 'b', ARGV[3])
if ARGV[2] == '1' then
  redis.call('HSET', state, 'final', epoch .. '-' .. seq)
end
if key ~= '' then
  redis.call('HSET', state, 'k:' .. key, seq .. ':' .. ARGV[12], 'keyed', 1)
  if redis.call('RPUSH', keys, key) > tonumber(ARGV[4]) then
    redis.call('HDEL', state, 'k:' .. redis.call('LPOP', keys))
  end
end
redis.call('PEXPIRE', state, ARGV[5])
redis.call('PEXPIRE', stream, ARGV[5])
if key ~= '' or st[3] then
  redis.call('PEXPIRE', keys, ARGV[5])
end
-- The hash's expiry is set once, two windows from when it began, so what is left of it
-- tells its age by Redis's own clock (no process's clock, which may be off).
local window = tonumber(ARGV[9])
local left = redis.call('PTTL', seqs)
if left >= 0 and left <= window then
  redis.call('RENAME', seqs, earlier)  -- a window old: it lives out its second one aside
  left = -2
end
redis.call('HSET', seqs, ARGV[8], seq)
if left < 0 then
  redis.call('PEXPIRE', seqs, 2 * window)
end
redis.call('PUBLISH', ARGV[7],
           seq .. '|' .. epoch .. '|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3])
return {1, epoch, seq, rewound}
"""

# KEYS: state, stream. ARGV: after epoch ('' for none), after seq, the most entries to
# return (0 for all), and a fresh epoch when 'after' is what this process has seen of the
# stream (its live connection's catch-up). Returns {} when there is no stream, else
# {epoch, last_seq, final_id or '', gap, entries}; gap is 2 when the stream was behind
# such a position: it lost writes, and took the fresh epoch (see APPEND_LUA).
READ_LUA = """
local function range(from, most)
  if most > 0 then
    return redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', most)
  end
  return redis.call('XRANGE', KEYS[2], from, '+')
end
local st = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'final')
local epoch = st[1]
if not epoch then
  return {}
end
local last = tonumber(st[2])
local final = st[3] or ''
local most = tonumber(ARGV[3])
if ARGV[1] == '' then
  return {epoch, last, final, 0, range('-', most)}
end
local after = tonumber(ARGV[2])
local gap = 1
if ARGV[4] and ARGV[1] == epoch and after > last and final == '' then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  gap = 2
end
if ARGV[1] == epoch and after <= last then
  -- From 'after' itself, which is dropped when there: one more than asked for.
  local entries = range(ARGV[2] .. '-0', most > 0 and most + 1 or 0)
  local first = entries[1]
  if not first then
    if after == last then
      return {epoch, last, final, 0, entries}
    end
  else
    local first_seq = tonumber(string.match(first[1], '^(%d+)'))
    if first_seq == after then
      table.remove(entries, 1)
      return {epoch, last, final, 0, entries}
    elseif first_seq == after + 1 then
      -- 'after' itself was trimmed, but nothing after it was: nothing is missed.
      if most > 0 and #entries > most then
        table.remove(entries)
      end
      return {epoch, last, final, 0, entries}
    end
  end
end
return {epoch, last, final, gap, range('-', most)}
"""

# KEYS: state, stream, lease, nonces, keys, nonce seqs, earlier nonce seqs. ARGV: fresh
# epoch, ttl_ms, nonce, lease owner ('' for no lease), lease ttl_ms. Returns 1 for the
# first caller.
#
# A claim is also taken again by the process that made it, while its lease holds, if
# nothing was stored in it and it has not ended: a claim whose answers never reached
# that process (its client got 503; a retry with the same id must not get 409 for
# session_ttl). The process checks first that it runs no workflow of the session
# (WorkflowRunner). Never another process's: one that stalled between its claim and its
# first event would run the session alongside; nor once the lease has lapsed, when a
# lease monitor may be ending the session.
CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local st = redis.call('HMGET', KEYS[1], 'claimed', 'seq', 'final', 'leased')
  if st[1] == ARGV[3] then
    -- our own earlier attempt, whose answer was lost: its lease may have lapsed since
    if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5]) end
    return 1
  end
  if ARGV[4] == '' or not st[4] or st[2] ~= '0' or st[3] then
    return 0
  end
  if redis.call('GET', KEYS[3]) ~= ARGV[4] then
    return 0
  end
  redis.call('HSET', KEYS[1], 'claimed', ARGV[3])  -- taken again: same epoch, nothing in it
else
  redis.call('DEL', KEYS[2], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', 0, 'claimed', ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'leased', 1)
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: state, lease, events, keys. ARGV: owner, lease ttl_ms, session ttl_ms. Returns 1 when
# the lease is held now. An expired lease is taken again (its workflow still runs); an
# ended session's is not, nor one another owner holds. 'leased' is set again on a stream
# that was recreated. The session's keys get session_ttl again, as an append gives them:
# a running workflow's history must not expire while its agents are silent.
RENEW_LUA = """
if redis.call('HGET', KEYS[1], 'final') then
  return 0
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'leased', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return 1
"""

# KEYS: lease. ARGV: owner. Deletes the lease only if the owner holds it.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: state, lease. Returns the LeaseState (see server.brokers.base).
LEASE_STATE_LUA = """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'final', 'leased')
local held = redis.call('EXISTS', KEYS[2]) == 1
if not st[1] then
  if held then return 'held' end
  return 'gone'
end
if st[2] then return 'ended' end
if held then return 'held' end
if st[3] then return 'lost' end
return 'none'
"""

# LEASE_STATE_LUA's answers, as the broker returns them.
LEASE_STATES: dict[str, LeaseState] = {
    "held": "held",
    "lost": "lost",
    "ended": "ended",
    "none": "none",
    "gone": "gone",
}
