"""Lua scripts for the buffer's multi-key invariants, each registered once per client.

Every script touches only keys of one deployment (one hash tag), so it runs unchanged on Redis Cluster.
"""

from __future__ import annotations

INGEST = """
-- Insert a batch of samples atomically, skipping ids already present, then evict down to capacity.
-- KEYS[1] = ids hash     KEYS[2] = samples hash   KEYS[3] = seq         KEYS[4] = ingest stream
-- KEYS[5] = rank zset    KEYS[6] = counters hash
-- ARGV[1] = capacity (max live samples)   ARGV[2] = FRESH_BASE   ARGV[3] = stream MAXLEN (approximate)
-- ARGV[4 + 4k .. 7 + 4k] = id, source, content group, payload of sample k
-- returns {accepted, duplicates, evicted, flag_1, ..., flag_n} (flag 1 = accepted, 0 = duplicate)
local cap = tonumber(ARGV[1])
local fresh = tonumber(ARGV[2])
local out = {0, 0, 0}
-- pass 1: which samples are new (not stored, not earlier in this batch)
local new, seen = {}, {}
for b = 4, #ARGV, 4 do
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
local dups = (#ARGV - 3) / 4 - accepted
-- pass 2: ordinals from one INCRBY, then variadic writes in chunks (fewer calls per sample)
if accepted > 0 then
  local first = redis.call('INCRBY', KEYS[3], accepted) - accepted + 1
  local CHUNK = 256
  for c = 1, accepted, CHUNK do
    local ids, samples, ranks = {}, {}, {}
    for j = c, math.min(c + CHUNK - 1, accepted) do
      local b, o = new[j], first + j - 1
      ids[#ids + 1] = ARGV[b]; ids[#ids + 1] = o
      samples[#samples + 1] = o; samples[#samples + 1] = ARGV[b + 3]
      ranks[#ranks + 1] = fresh + o; ranks[#ranks + 1] = o
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
  for i = 1, #victims, 2 do
    local o = victims[i]
    local payload = redis.call('HGET', KEYS[2], o)
    if payload then
      redis.call('HDEL', KEYS[2], o)
      -- payloads are compact JSON whose first key is the id (no escapes: ids are [A-Za-z0-9._:-])
      redis.call('HDEL', KEYS[1], string.match(payload, '^{"id":"([^"]*)"'))
      evicted = evicted + 1
    end
  end
end
if accepted > 0 then redis.call('HINCRBY', KEYS[6], 'ingested', accepted) end
if dups > 0 then redis.call('HINCRBY', KEYS[6], 'duplicates', dups) end
if evicted > 0 then redis.call('HINCRBY', KEYS[6], 'evicted', evicted) end
out[1], out[2], out[3] = accepted, dups, evicted
return out
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
