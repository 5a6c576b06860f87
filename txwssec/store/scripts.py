"""
The Lua scripts of the Redis state store (L{txwssec.store.redis}): each runs
atomically in Redis, so that two nodes racing for the last connection under
a cap, or for one ticket, cannot both win.

Leases (connections, sessions) are members of sorted sets scored by their
expiry in milliseconds of Redis's own clock (C{TIME}: one clock for every
node); a lease that is not renewed (its node died) drops out of every count
once it expires, and the key itself expires with its last lease.
"""

from __future__ import annotations

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: The writes nobody waits for (see L{APPLY}): from ARGV[first], C{count}
#: values, three per write; KEYS[1] the session lease set, KEYS[2] the records.
_WRITES = """
local function apply(first, count, lease)
  for i = first, first + count - 1, 3 do
    local op = ARGV[i]
    if op == 'zrem' then
      redis.call('ZREM', ARGV[i + 1], ARGV[i + 2])
    elseif op == 'sadd' then
      redis.call('ZADD', KEYS[1], now + lease, ARGV[i + 1])
      redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
    elseif op == 'srem' then
      redis.call('ZREM', KEYS[1], ARGV[i + 1])
      redis.call('HDEL', KEYS[2], ARGV[i + 1])
    end
  end
end
"""

#: KEYS[1], KEYS[2] as L{APPLY}'s, then the lease sets (a consumer's, and
#: the connection's address's); ARGV lease (ms), the number of values of
#: this node's batched writes, those writes (as L{APPLY}'s: applied first,
#: so that this node's own releases count), then a cap (0: none) and a
#: member per lease set. Answers the index (from 1) of the first lease set
#: at its cap (nothing taken), or 0 when a lease was taken in every set.
#: One script per capped handshake: its writes travel with it.
ACQUIRE = (
    _NOW_MS
    + _WRITES
    + """
local lease = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
apply(3, count, lease)
local base = 2 + count
for i = 3, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local cap = tonumber(ARGV[base + 2 * (i - 2) - 1])
  if cap > 0 and redis.call('ZCARD', KEYS[i]) >= cap then
    return i - 2
  end
end
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], now + lease, ARGV[base + 2 * (i - 2)])
  redis.call('PEXPIRE', KEYS[i], lease)
end
return 0
"""
)

#: KEYS lease sets; ARGV[1] lease (ms), then one member per key: renewed
#: (or added again after Redis lost them).
RENEW = (
    _NOW_MS
    + """
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], lease)
end
return #KEYS
"""
)

#: KEYS[1] the session lease set, KEYS[2] the records; ARGV[1] lease (ms),
#: then the writes nobody waits for, in order, three values each: C{zrem}
#: (a lease set, a member: a connection ended), C{sadd} (an id, a record: a
#: session opened), C{srem} (an id, "": a session ended).
APPLY = (
    _NOW_MS
    + _WRITES
    + """
apply(2, #ARGV - 1, tonumber(ARGV[1]))
return 1
"""
)

#: KEYS[1] the session lease set, KEYS[2] the records: drops the expired
#: ones (their node died), answers the records of the others.
LIST_SESSIONS = (
    _NOW_MS
    + """
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 1, #stale, 500 do
  redis.call('HDEL', KEYS[2], unpack(stale, i, math.min(i + 499, #stale)))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('HVALS', KEYS[2])
"""
)

#: KEYS[1] a key's failures this minute, KEYS[2] last minute's, KEYS[3] the
#: lockouts (scored by their end); ARGV the counter's life (ms), now, the
#: window, the limit, the key, the channel, the node. Counted; when the
#: estimate (as L{txwssec.limits.FailureWindow}'s) reaches the limit, the
#: time it will drop below it (no more failures) is kept and told to every
#: node, which then answer C{blocked_for} from their replica.
RECORD_FAILURE = """
local cur = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local now, window, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local start = math.floor(now / window) * window
local elapsed = (now - start) / window
if cur + prev * (1 - elapsed) < limit then
  return '0'
end
local ends
if cur >= limit then
  ends = start + window + window * (1 - limit / cur)
else
  ends = start + window * (1 - (limit - cur) / prev)
end
redis.call('ZADD', KEYS[3], 'GT', ends, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('PUBLISH', ARGV[6],
  cjson.encode({node = ARGV[7], op = 'blocked', key = ARGV[5], ['until'] = ends}))
return string.format('%.6f', ends)
"""

#: KEYS[1] a consumer's bucket; ARGV rate, burst, tokens used since the
#: last call. Refilled from Redis's clock; answers the tokens left (text).
BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, used = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.max(-burst, math.min(burst, tokens + (now - at) * rate) - used)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
           'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst / rate + 60) * 1000))
return string.format('%.6f', tokens)
"""

#: KEYS[1] the revocations (scored by their end); ARGV key, until, now,
#: channel, message. Kept with the latest end, expired ones dropped, and
#: told to every node.
REVOKE = """
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
