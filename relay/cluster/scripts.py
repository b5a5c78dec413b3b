"""The Lua scripts that make each shared decision atomic in Redis.

Each runs by EVALSHA (redis-py's registered scripts load it on NOSCRIPT, after a Redis
restart for instance). The clock is Redis's own (`TIME`), so nodes whose clocks differ
agree on every expiry and every rate; Redis 7 replicates a script's effects, not the
script, so reading TIME in it is allowed.

Key layout (the prefix is `relay:`):
    relay:slots:<lane>     ZSET lease id → expiry (ms); lease id is "<node>/<random>"
    relay:wanted:<lane>    set for 2 s when a node was refused a slot of the lane
    relay:rate:<lane>:<name>  string: the GCRA's theoretical arrival time (ms)
    relay:rate:<lane>:rcpt:<address>  the same per mailbox (recipient_rate)
    relay:account-rate:<name>  the same per account (accounts[].rate)
    relay:lanes            HASH "<lane> <kind>" → LaneEvent JSON; channel relay:lanes
    relay:guard            HASH account → GuardEvent JSON; channel relay:guard
    relay:nodes            HASH node → {"time", "address"}; relay:node:<node> its TTL
    relay:auth:ip:<ip>, relay:auth:account:<name>   failure counters with the window's TTL
    relay:lock:<name>, relay:fence:<name>   a lock and its fencing counter
"""

from __future__ import annotations

NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] slots, KEYS[2] the lane's "wanted" flag; ARGV max, lease ms, lease id
# → 1 granted, 0 all held (and the flag says so for 2 s: an idle holder lets go)
ACQUIRE = (
    NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) == false
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', 2000)
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""
)

# KEYS slots (one per lease); ARGV lease ms, then per lease: id, max.
# A lease still there is extended. One that is gone (Redis restarted, or it was taken
# while Redis was down, or it expired) is taken again if there is room: else 0, lost.
RENEW = (
    NOW_MS
    + """
local ms = tonumber(ARGV[1])
local result = {}
for i, key in ipairs(KEYS) do
  local id, max = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', key, id) ~= false or redis.call('ZCARD', key) < max then
    redis.call('ZADD', key, now + ms, id)
    redis.call('PEXPIRE', key, ms * 2)
    result[i] = 1
  else
    result[i] = 0
  end
end
return result
"""
)

# KEYS[1] slots; ARGV lease id
RELEASE = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# GCRA as in relay/shaping/rate.py, in ms. KEYS[1] the TAT; ARGV interval, tolerance,
# mode. "take": take if allowed, return the delay (0: taken). "reserve": always take the
# next slot of the cluster's timeline and return how long until it may be used, so a
# node waits for its own slot instead of racing the others for the next free one.
# "refund": give back one interval.
GCRA = (
    NOW_MS
    + """
local interval, tolerance, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if mode == 'refund' then
  if tat > now then
    redis.call('SET', KEYS[1], tostring(tat - interval), 'PX', math.ceil(tat - now) + 1000)
  end
  return '0'
end
local delay = tat - tolerance - now
if delay < 0 then delay = 0 end
if mode == 'reserve' or delay == 0 then
  local new = math.max(tat, now) + interval
  redis.call('SET', KEYS[1], tostring(new), 'PX', math.ceil(new - now) + 1000)
end
return tostring(delay)
"""
)

# recipient_rate: GCRA without burst, one key per mailbox of a batch, decided in order.
# ARGV interval ms, then per key a floor: ms from now before which this node knows the
# mailbox may not have another (it sent one while Redis was down, which Redis never
# saw). → per key "0" (taken) or the wait in ms. Keys expire one interval after their
# TAT, so a mailbox written to once costs nothing for long.
MAILBOXES = (
    NOW_MS
    + """
local interval = tonumber(ARGV[1])
local result = {}
for i, key in ipairs(KEYS) do
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now + tonumber(ARGV[i + 1]))
  if tat <= now then
    redis.call('SET', key, tostring(now + interval), 'PX', math.ceil(interval) + 1000)
    result[i] = '0'
  else
    result[i] = tostring(tat - now)
  end
end
return result
"""
)

# KEYS[1] nodes hash, KEYS[2] this node's key; ARGV node, address, ttl ms
# → the number of live nodes (whose key has not expired), this one included
HEARTBEAT = (
    NOW_MS
    + """
local record = cjson.encode({time = now / 1000, address = ARGV[2]})
redis.call('SET', KEYS[2], record, 'PX', tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], ARGV[1], record)
local live = 0
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('EXISTS', 'relay:node:' .. name) == 1 then live = live + 1 end
end
return live
"""
)

# KEYS[1] counter; ARGV window ms → the count after this failure
COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return n
"""

# KEYS[1] lock, KEYS[2] fence; ARGV holder, ttl ms → the fencing token, or 0 if held
LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', tonumber(ARGV[2]))
  return token
end
return 0
"""

# KEYS[1] lock; ARGV holder, token, ttl ms (0: release) → 1 if still ours
KEEP_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then return 0 end
if tonumber(ARGV[3]) == 0 then redis.call('DEL', KEYS[1]) else
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3])) end
return 1
"""

# KEYS[1] the events' hash (and channel); ARGV field, event JSON, its `at`
# → 1 stored and published; 0 the hash holds a later event for that field (an event
# delayed in a node's outbox, or a node's clock behind): old news is not kept.
STORE_EVENT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, decoded = pcall(cjson.decode, old)
  if ok and type(decoded) == 'table' and tonumber(decoded['at']) ~= nil
     and tonumber(decoded['at']) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[2])
return 1
"""
