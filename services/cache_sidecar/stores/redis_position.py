"""The Redis store's position in the invalidation log, kept in Redis itself (the rules
are position.py's): every sidecar on one Redis shares it, and each change is one Lua
script, so concurrent sidecars never lose each other's updates.

    dh:sync:{log}          "applied", a decimal string; missing = fresh
    dh:sync:{log}:ahead    sorted set of the entries applied out of order (score = seq)

Both carry the hash tag {log}, so the scripts that touch both stay single-slot. No
TTL: a Redis that loses them (restart, flush) is fresh, which is what it should be.
Sequences are exact in Lua's doubles up to 2**53 (the servicer refuses larger ones).
"""

from __future__ import annotations

from services.cache_sidecar.stores.position import MAX_AHEAD

# Drops the ahead entries at or below `applied`, absorbing those that continue it.
_ABSORB = """
local function absorb(applied)
  while true do
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if #first == 0 then break end
    local sequence = tonumber(first[2])
    if sequence > applied + 1 then break end
    redis.call('ZREM', KEYS[2], first[1])
    if sequence > applied then applied = sequence end
  end
  redis.call('SET', KEYS[1], string.format('%d', applied))
end
local function state(status)
  local applied = redis.call('GET', KEYS[1])
  if not applied then return {status, false} end
  local reply = {status, applied}
  for _, sequence in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do reply[#reply + 1] = sequence end
  return reply
end
"""

# KEYS: applied, ahead. → {1, applied or false, ahead…}
STATE = _ABSORB + """
return state(1)
"""

# An Invalidate that carried log entry ARGV[1] has been applied. KEYS: applied, ahead.
RECORD = _ABSORB + """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local applied = tonumber(current)
local sequence = tonumber(ARGV[1])
if sequence == applied + 1 then
  absorb(sequence)
elseif sequence > applied + 1 then
  redis.call('ZADD', KEYS[2], sequence, ARGV[1])
  local extra = redis.call('ZCARD', KEYS[2]) - MAX_AHEAD
  if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1) end
end
return 1
"""

# A Sync of (ARGV[1], ARGV[2]] whose patterns are applied. KEYS: applied, ahead.
# → the new state, or {0, applied} when the position is below ARGV[1].
SYNC = _ABSORB + """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[2])
  return state(1)
end
local applied = tonumber(current)
if tonumber(ARGV[1]) > applied then return {0, current} end
local through = tonumber(ARGV[2])
if through > applied then applied = through end
absorb(applied)
return state(1)
"""

SCRIPTS = {
    name: source.replace("MAX_AHEAD", str(MAX_AHEAD))
    for name, source in {"position_state": STATE, "position_record": RECORD, "position_sync": SYNC}.items()
}
