"""Lua scripts for the buffer's multi-key invariants, each registered once per client.

Every script touches only keys of one hash tag (the deployment's ``{p}``, or one shard's ``{p:s}`` for a
sharded buffer: store/keys.py), so it runs unchanged on Redis Cluster.
"""

from __future__ import annotations

INGEST = """
-- Insert a batch of samples atomically, skipping ids already present, then evict down to capacity.
-- KEYS[1] = ids hash     KEYS[2] = samples hash   KEYS[3] = seq         KEYS[4] = ingest stream
-- KEYS[5] = eviction priority zset   KEYS[6] = counters hash   KEYS[7] = evictions stream
-- ARGV[1] = capacity (max live samples of this shard)   ARGV[2] = UNWEIGHTED_PRIORITY
-- ARGV[3] = stream MAXLEN (approximate)   ARGV[4] = ordinal base: shard << SHARD_BITS (0 unsharded)
-- ARGV[5 + 4k .. 8 + 4k] = id, source, content group, payload of sample k
-- returns {accepted, duplicates, evicted, first ordinal (0 if none accepted), flag_1, ..., flag_n}
-- (flag 1 = accepted, 0 = duplicate); the accepted samples got ordinals first .. first + accepted - 1
local cap = tonumber(ARGV[1])
local fresh = tonumber(ARGV[2])
local base = tonumber(ARGV[4])
local out = {0, 0, 0, 0}
-- pass 1: which samples are new (not stored, not earlier in this batch)
local new, seen = {}, {}
for b = 5, #ARGV, 4 do
  local id = ARGV[b]
  if seen[id] or redis.call('HEXISTS', KEYS[1], id) == 1 then
    out[#out + 1] = 0
  else
    seen[id] = true
    new[#new + 1] = b
    out[#out + 1] = 1
  end
end
local accepted = #new
local dups = (#ARGV - 4) / 4 - accepted
-- pass 2: ordinals from one INCRBY, then variadic writes in chunks (fewer calls per sample)
if accepted > 0 then
  local first = base + redis.call('INCRBY', KEYS[3], accepted) - accepted + 1
  out[4] = first
  local CHUNK = 256
  for c = 1, accepted, CHUNK do
    local ids, samples, ranks = {}, {}, {}
    for j = c, math.min(c + CHUNK - 1, accepted) do
      -- the ordinal as an integer string: Lua 5.1 would print a number above 1e14 in exponent form
      local b, n = new[j], first + j - 1
      local o = string.format('%.0f', n)
      ids[#ids + 1] = ARGV[b]; ids[#ids + 1] = o
      samples[#samples + 1] = o; samples[#samples + 1] = ARGV[b + 3]
      ranks[#ranks + 1] = fresh + n; ranks[#ranks + 1] = o
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'o', o, 's', ARGV[b + 1], 'g', ARGV[b + 2])
    end
    redis.call('HSET', KEYS[1], unpack(ids))
    redis.call('HSET', KEYS[2], unpack(samples))
    redis.call('ZADD', KEYS[5], unpack(ranks))
  end
end
local evicted = 0
local over = redis.call('HLEN', KEYS[2]) - cap
if over > 0 then
  -- lowest rank first: the trainer's lowest weights, else the oldest never-weighted samples
  local victims = redis.call('ZPOPMIN', KEYS[5], over)
  local gone = {}
  for i = 1, #victims, 2 do
    local o = victims[i]
    local payload = redis.call('HGET', KEYS[2], o)
    if payload then
      redis.call('HDEL', KEYS[2], o)
      -- payloads are compact JSON whose first key is the id (no escapes: ids are [A-Za-z0-9._:-])
      redis.call('HDEL', KEYS[1], string.match(payload, '^{"id":"([^"]*)"'))
      evicted = evicted + 1
      gone[#gone + 1] = o
    end
  end
  -- one entry per request: the trainer reads evictions instead of asking about every sample it holds
  -- n numbers the entries, so a reader can tell that entries it never read were trimmed away
  if #gone > 0 then
    local n = redis.call('HINCRBY', KEYS[6], 'eviction_entries', 1)
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], '*', 'n', n, 'o', table.concat(gone, ','))
  end
end
if accepted > 0 then redis.call('HINCRBY', KEYS[6], 'ingested', accepted) end
if dups > 0 then redis.call('HINCRBY', KEYS[6], 'duplicates', dups) end
if evicted > 0 then redis.call('HINCRBY', KEYS[6], 'evicted', evicted) end
out[1], out[2], out[3] = accepted, dups, evicted
return out
"""

INGEST_UNDO = """
-- Undo one shard's INGEST of a request that failed on another shard (store.buffer, sharded buffers): remove
-- the samples that call inserted and are still stored, list them in the evictions stream (a trainer that
-- already read them drops them, as it drops evicted samples) and take the call off the counters.
-- KEYS[1] = ids hash   KEYS[2] = samples hash   KEYS[3] = eviction priority zset   KEYS[4] = counters hash
-- KEYS[5] = evictions stream
-- ARGV[1] = stream MAXLEN (approximate)   ARGV[2] = first ordinal the call inserted   ARGV[3] = how many
-- ARGV[4] = the call's duplicates
-- returns how many samples were removed (the rest had left the buffer meanwhile: evicted, quarantined)
local first, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local gone = {}
for j = 0, n - 1 do
  local o = string.format('%.0f', first + j)
  local payload = redis.call('HGET', KEYS[2], o)
  if payload then
    local id = string.match(payload, '^{"id":"([^"]*)"')
    redis.call('HDEL', KEYS[2], o)
    redis.call('ZREM', KEYS[3], o)
    if id and redis.call('HGET', KEYS[1], id) == o then redis.call('HDEL', KEYS[1], id) end
    gone[#gone + 1] = o
  end
end
if #gone > 0 then
  local e = redis.call('HINCRBY', KEYS[4], 'eviction_entries', 1)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[1], '*', 'n', e, 'o', table.concat(gone, ','))
  redis.call('HINCRBY', KEYS[4], 'ingested', -#gone)
end
if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[4], 'duplicates', -tonumber(ARGV[4])) end
return #gone
"""

LAYOUT = """
-- The shard count this deployment's buffer is written with, recorded by the first process to store.
-- KEYS[1] = the layout marker   KEYS[2] = the one-shard buffer's seq   ARGV[1] = the caller's shard count
-- ARGV[2] = "record" (a process about to write or consume the buffer) or "check" (a read: writes nothing)
-- returns the deployment's shard count: the marker's; when there is none, 1 if a one-shard buffer already
-- holds samples (from before the marker existed), else the caller's when recording (the marker is set to
-- it), else 0 (nothing recorded yet: nothing to disagree with)
local cur = redis.call('GET', KEYS[1])
if cur then return tonumber(cur) end
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[1] ~= '1' then return 1 end
end
if ARGV[2] ~= 'record' then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return tonumber(ARGV[1])
"""

VALIDATION = """
-- Replace or append to the validation set and bump its version, atomically.
-- KEYS[1] = validation list   KEYS[2] = validation version
-- ARGV[1] = "replace" | "append"   ARGV[2] = max size   ARGV[3..] = payloads
-- returns {count, version}, or {-1, current count} when the set would exceed its max size
local n = #ARGV - 2
local current = 0
if ARGV[1] == 'append' then current = redis.call('LLEN', KEYS[1]) end
if current + n > tonumber(ARGV[2]) then return {-1, current} end
if ARGV[1] == 'replace' then redis.call('DEL', KEYS[1]) end
for i = 3, #ARGV, 5000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 4999, #ARGV)))
end
local version = redis.call('INCR', KEYS[2])
return {redis.call('LLEN', KEYS[1]), version}
"""

WEIGHTS_OF = """
-- Current weights of sample ids, with the step they were published at, in one round trip, as JSON.
-- KEYS[1] = ids hash   KEYS[2] = rank zset   KEYS[3] = trainer status hash (absent for a shard of a
-- sharded buffer: the status is on another slot, and the step is read apart, store.buffer.weights_of)
-- ARGV[1] = comma-separated sample ids, each already checked to be 1-128 characters of [A-Za-z0-9._:-]
--           (so no id needs escaping in JSON)   ARGV[2] = UNWEIGHTED_PRIORITY
-- returns {weights step or false, the members of a JSON object: "id":weight,... for the stored ids}
-- A rank score at or above UNWEIGHTED_PRIORITY is a sample the trainer has not weighted: weight 1.0.
local fresh = tonumber(ARGV[2])
local ids, seen = {}, {}
for id in string.gmatch(ARGV[1], '[^,]+') do
  if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
end
local parts = {}
local CHUNK = 1000  -- ids per HMGET / ZMSCORE: unpack() has a stack limit
for c = 1, #ids, CHUNK do
  local last = math.min(c + CHUNK - 1, #ids)
  local ords = redis.call('HMGET', KEYS[1], unpack(ids, c, last))
  local found, names = {}, {}
  for i = 1, #ords do
    if ords[i] then found[#found + 1] = ords[i]; names[#names + 1] = ids[c + i - 1] end
  end
  if #found > 0 then
    local scores = redis.call('ZMSCORE', KEYS[2], unpack(found))
    for i = 1, #found do
      local s = scores[i]
      if s then
        if tonumber(s) >= fresh then s = '1.0' end
        parts[#parts + 1] = '"' .. names[i] .. '":' .. s
      end
    end
  end
end
local step = false
if KEYS[3] then step = redis.call('HGET', KEYS[3], 'weights_step') end
return {step, table.concat(parts, ',')}
"""

# --- the trainer's lease (one writer at a time) and the writes it fences --------------------------------
# A lease value is "<fencing token> <host> <pid>". Every trainer write below first checks that the lease
# still holds the caller's value and otherwise fails with the error "NOLEASE <current value>", so a trainer
# that lost its lease (paused past the TTL, partitioned) can never publish over its successor's work: the
# fencing-token scheme of Kleppmann, "How to do distributed locking" (2016), with Redis as the store that
# checks the token.

_FENCE_CHECK = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then return redis.error_reply('NOLEASE ' .. (holder or '')) end
"""

# A shard of a sharded buffer is on another slot than the lease, so a script writing a shard cannot read
# the lease (CROSSSLOT). It checks the caller's fencing token against the highest token that has written
# to that shard instead, and raises it: the storage-side check of Kleppmann (2016). A trainer raises every
# shard's token when it takes the lease (store.lease), so a predecessor that wakes up after that is refused
# on every shard, with the same "NOLEASE ..." error as the lease check.
_SHARD_FENCE_CHECK = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
local token = tonumber(ARGV[1])
if token < seen then
  return redis.error_reply('NOLEASE fencing token ' .. seen .. ' has written to this shard since')
end
if token > seen then redis.call('SET', KEYS[1], ARGV[1]) end
"""

FENCE_SHARD_CLAIM = (
    """
-- Raise a shard's fencing token to the caller's (a trainer that took the lease claims every shard).
-- KEYS[1] = the shard's fence_seen   ARGV[1] = the caller's fencing token
"""
    + _SHARD_FENCE_CHECK
    + """
return 1
"""
)

LEASE_ACQUIRE = """
-- Take the trainer lease if it is free (or held by ARGV[4], a holder known to be dead).
-- KEYS[1] = lease   KEYS[2] = fence counter
-- ARGV[1] = TTL (ms)   ARGV[2] = "<host> <pid>"   ARGV[3] = the caller's previous token, or 0
-- ARGV[4] = a dead holder's exact lease value to take over, or ""
-- returns {token, value}; {0, current value} when another holds it; {-1, fence} when the caller held it
-- before (ARGV[3] > 0) and someone else has held it since: the caller's state is stale
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[4] then return {0, cur} end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
local prev = tonumber(ARGV[3])
if prev > 0 and fence > prev then return {-1, tostring(fence)} end
if prev > fence then fence = prev end  -- the counter was lost (a Redis without persistence restarted)
fence = fence + 1
redis.call('SET', KEYS[2], fence)
local value = fence .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[1])
return {fence, value}
"""

LEASE_RENEW = """
-- KEYS[1] = lease   ARGV[1] = the caller's lease value   ARGV[2] = TTL (ms)
-- returns 1 renewed, 0 the lease is gone (expired or lost with Redis's data), -1 another trainer holds it
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not cur then return 0 end
return -1
"""

LEASE_RELEASE = """
-- KEYS[1] = lease   ARGV[1] = the caller's lease value; deletes it only if it is still the caller's
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RANKS = """
local CHUNK = 1000  -- pairs per ZADD: unpack() has a stack limit
for i = 2, #ARGV, 2 * CHUNK do
  redis.call('ZADD', KEYS[2], 'XX', unpack(ARGV, i, math.min(i + 2 * CHUNK - 1, #ARGV)))
end
return 1
"""

FENCED_RANKS = (
    """
-- Publish per-sample weights into the rank zset (existing members only: ZADD XX never re-adds a sample
-- the API evicted meanwhile), under the lease.
-- KEYS[1] = lease   KEYS[2] = rank zset   ARGV[1] = lease value   ARGV[2..] = score, member pairs
"""
    + _FENCE_CHECK
    + _RANKS
)

FENCED_SHARD_RANKS = (
    """
-- FENCED_RANKS for one shard of a sharded buffer, fenced by the shard's token.
-- KEYS[1] = the shard's fence_seen   KEYS[2] = its rank zset   ARGV[1] = fencing token
-- ARGV[2..] = score, member pairs
"""
    + _SHARD_FENCE_CHECK
    + _RANKS
)

FENCED_STATUS = (
    """
-- The weights document and the trainer's status hash, under the lease; a new document is announced on
-- the weights channel (API workers drop their cached copy).
-- KEYS[1] = lease   KEYS[2] = weights document   KEYS[3] = trainer status hash   KEYS[4] = the channel
-- ARGV[1] = lease value   ARGV[2] = the document ("" to leave it)   ARGV[3..] = status field, value pairs
"""
    + _FENCE_CHECK
    + """
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('PUBLISH', KEYS[4], '1')
end
if #ARGV > 2 then redis.call('HSET', KEYS[3], unpack(ARGV, 3)) end
return 1
"""
)

FENCED_RESERVE_VERSION = (
    """
-- Reserve the next checkpoint version, under the lease, before its file is written: two trainers can
-- never write the same version.
-- KEYS[1] = lease   KEYS[2] = last reserved version   ARGV[1] = lease value
-- ARGV[2] = floor: the newest version known elsewhere (database rows, files on disk)
-- returns the reserved version (> floor and > every version reserved before)
"""
    + _FENCE_CHECK
    + """
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local floor = tonumber(ARGV[2])
if floor > v then v = floor end
v = v + 1
redis.call('SET', KEYS[2], v)
return v
"""
)

_QUARANTINE = """
local n = 0
for b = 4, #ARGV, 3 do
  local o = ARGV[b]
  local payload = redis.call('HGET', KEYS[2], o)
  if payload then
    local id = string.match(payload, '^{"id":"([^"]*)"') or ''
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*', 'id', id, 'source', ARGV[b + 1],
      'ordinal', o, 'reason', ARGV[b + 2], 'step', ARGV[3], 'payload', payload)
    redis.call('HDEL', KEYS[2], o)
    redis.call('ZREM', KEYS[3], o)
    if id ~= '' then redis.call('HDEL', KEYS[4], id) end
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[6], 'quarantined', n) end
return n
"""

FENCED_QUARANTINE = (
    """
-- Quarantine samples the trainer cannot use: each leaves the buffer (payload, rank, id) and is listed,
-- with its reason, in the capped quarantine stream; counters.quarantined counts those still stored.
-- KEYS[1] = lease   KEYS[2] = samples hash   KEYS[3] = rank zset   KEYS[4] = ids hash
-- KEYS[5] = quarantine stream   KEYS[6] = counters hash
-- ARGV[1] = lease value   ARGV[2] = stream MAXLEN (approximate)   ARGV[3] = trainer step
-- ARGV[4 + 3k .. 6 + 3k] = ordinal, source, reason of sample k
-- returns how many were quarantined (a sample already evicted is not)
"""
    + _FENCE_CHECK
    + _QUARANTINE
)

FENCED_SHARD_QUARANTINE = (
    """
-- FENCED_QUARANTINE for one shard of a sharded buffer (its own quarantine stream), fenced by the shard's
-- token: KEYS[1] = the shard's fence_seen, ARGV[1] = fencing token, the other keys and arguments as there.
"""
    + _SHARD_FENCE_CHECK
    + _QUARANTINE
)
