"""The Lua scripts that make the store's multi-key writes atomic (and one read that would otherwise
take two round trips, :data:`STUDY_VARIANTS`).

Redis runs a script as one command: no other client sees a state between its writes, so a code
and its maps, its change-log entry and its study link always agree, whatever number of workers
write at once. Each script says which keys (``KEYS``) and arguments (``ARGV``) it takes; the owning
module (:mod:`plugin.store.codes`, :mod:`plugin.store.records`, :mod:`plugin.store.ingest`) passes them.
"""

from __future__ import annotations

# KEYS: lock. ARGV: token. Deletes the lock only when it is still ours.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Lua helper: study number of ARGV study uid, allocated on first sight. Needs sno, snext keys.
_STUDY_NUMBER_FUNCTIONS = """
local function study_number(sno, snext, suid)
  if suid == '' then return 0 end
  local sn = redis.call('HGET', sno, suid)
  if sn then return tonumber(sn) end
  sn = redis.call('INCR', snext)
  redis.call('HSET', sno, suid, sn)
  return sn
end
local function slot_sn(key, s)
  local raw = redis.call('GETRANGE', key, s * 4, s * 4 + 3)
  if string.len(raw) < 4 then return 0 end
  return struct.unpack('<I4', raw)
end
"""

# KEYS: codes, next, slot, uid, tomb, log, slotsn, sno, snext, instance, lock, rerank.
# ARGV: uid, code, nbytes, study uid ('' = look it up in the instance hash), log maxlen, rerank vector
# ('' = none: the slot's vector is left as it is).
# Returns {slot, changed}: changed is 0 when the same code, vector (and study) were already stored;
# {-1, 0} while a compaction holds the lock (the caller waits and retries).
UPSERT_CODE = (
    _STUDY_NUMBER_FUNCTIONS
    + """
if redis.call('EXISTS', KEYS[11]) == 1 then return {-1, 0} end
local nb = tonumber(ARGV[3])
local rr = ARGV[6]
local rw = string.len(rr)
local suid = ARGV[4]
if suid == '' then suid = redis.call('HGET', KEYS[10], 'study_uid') or '' end
local sn = study_number(KEYS[8], KEYS[9], suid)
local s = redis.call('HGET', KEYS[3], ARGV[1])
if s then
  s = tonumber(s)
  local same = redis.call('GETRANGE', KEYS[1], s * nb, s * nb + nb - 1) == ARGV[2]
  if same and rw > 0 then same = redis.call('GETRANGE', KEYS[12], s * rw, s * rw + rw - 1) == rr end
  if same then
    if sn ~= 0 and slot_sn(KEYS[7], s) ~= sn then
      redis.call('SETRANGE', KEYS[7], s * 4, struct.pack('<I4', sn))
      redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[5], '*', 'op', 'link', 'slot', s, 'sn', sn)
    end
    return {s, 0}
  end
  if sn == 0 then sn = slot_sn(KEYS[7], s) end
else
  s = redis.call('INCR', KEYS[2]) - 1
  redis.call('HSET', KEYS[3], ARGV[1], s)
  redis.call('HSET', KEYS[4], s, ARGV[1])
end
redis.call('SETRANGE', KEYS[1], s * nb, ARGV[2])
if rw > 0 then redis.call('SETRANGE', KEYS[12], s * rw, rr) end
redis.call('SETRANGE', KEYS[7], s * 4, struct.pack('<I4', sn))
redis.call('SETBIT', KEYS[5], s, 0)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[5], '*', 'op', 'set', 'slot', s, 'uid', ARGV[1],
           'code', ARGV[2], 'rr', rr, 'sn', sn)
return {s, 1}
"""
)

# KEYS: slot, uid, tomb, log, lock. ARGV: uid, log maxlen. Returns the freed slot, -1 when the
# UID has no code, -2 while a compaction holds the lock.
DELETE_CODE = """
if redis.call('EXISTS', KEYS[5]) == 1 then return -2 end
local s = redis.call('HGET', KEYS[1], ARGV[1])
if not s then return -1 end
s = tonumber(s)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], s)
redis.call('SETBIT', KEYS[3], s, 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'op', 'del', 'slot', s, 'uid', ARGV[1])
return s
"""

# KEYS: sno, snext, then (slot, slotsn, log, lock) for the image level of each model version.
# ARGV: sop uid, study uid, log maxlen. Points the instance's image slots at its study.
# Returns the study number, or -1 while a compaction holds a lock (nothing done).
LINK_INSTANCE = (
    _STUDY_NUMBER_FUNCTIONS
    + """
local i = 3
while i <= #KEYS do
  if redis.call('EXISTS', KEYS[i + 3]) == 1 then return -1 end
  i = i + 4
end
local sn = study_number(KEYS[1], KEYS[2], ARGV[2])
i = 3
while i <= #KEYS do
  local s = redis.call('HGET', KEYS[i], ARGV[1])
  if s then
    s = tonumber(s)
    if slot_sn(KEYS[i + 1], s) ~= sn then
      redis.call('SETRANGE', KEYS[i + 1], s * 4, struct.pack('<I4', sn))
      redis.call('XADD', KEYS[i + 2], 'MAXLEN', '~', ARGV[3], '*', 'op', 'link', 'slot', s, 'sn', sn)
    end
  end
  i = i + 4
end
return sn
"""
)

# KEYS: sno, snext. ARGV: study uid. Returns the study number (allocated on first sight).
STUDY_NUMBER = _STUDY_NUMBER_FUNCTIONS + "\nreturn study_number(KEYS[1], KEYS[2], ARGV[1])\n"

# KEYS: vocabulary hash. ARGV: terms. Returns their numbers (1, 2, ... in order of first sight).
VOCABULARY = """
local out = {}
for i, term in ipairs(ARGV) do
  local v = redis.call('HGET', KEYS[1], term)
  if not v then
    v = redis.call('HINCRBY', KEYS[1], '#next', 1)
    redis.call('HSET', KEYS[1], term, v)
  end
  out[i] = tonumber(v)
end
return out
"""

# KEYS: pending (zset), payload (hash), claim (hash). ARGV: own uid, max others, now, lease deadline,
# claimer (the Celery task id). A claim is "deadline|claimer". Returns {status, ...}: status 1 =
# claimed (own payload, "" when the hint was lost, then the others' payloads), 0 = own instance
# under a live claim of another task (the second element is that claim's deadline). A claim made
# by the same task id is this very message delivered again after its worker died: taken over.
CLAIM_BATCH = """
local own = ARGV[1]
local now = tonumber(ARGV[3])
local me = ARGV[5]
local function live(c)
  if not c then return false end
  local deadline, who = string.match(c, '^([^|]+)|(.*)$')
  return tonumber(deadline) > now and who ~= me, deadline
end
local busy, deadline = live(redis.call('HGET', KEYS[3], own))
if busy then
  return {0, deadline}
end
local claim = ARGV[4] .. '|' .. me
local out = {1, redis.call('HGET', KEYS[2], own) or ''}
redis.call('ZREM', KEYS[1], own)
redis.call('HSET', KEYS[3], own, claim)
local n = tonumber(ARGV[2])
if n > 0 then
  local others = redis.call('ZRANGE', KEYS[1], 0, n - 1)
  for _, uid in ipairs(others) do
    redis.call('ZREM', KEYS[1], uid)
    local p = redis.call('HGET', KEYS[2], uid)
    if p and not live(redis.call('HGET', KEYS[3], uid)) then
      redis.call('HSET', KEYS[3], uid, claim)
      table.insert(out, p)
    end
  end
end
return out
"""

# KEYS: study hash, study instances set. ARGV: modality, received_at, then field/value pairs.
# Merges the modality into the comma-joined sorted set and keeps the latest arrival: concurrent
# workers on one study must not lose each other's updates.
MERGE_STUDY = """
local h = KEYS[1]
for i = 3, #ARGV, 2 do
  redis.call('HSET', h, ARGV[i], ARGV[i + 1])
end
local mods = {}
local seen = {}
local cur = redis.call('HGET', h, 'modalities') or ''
for m in string.gmatch(cur, '[^,]+') do
  if not seen[m] then seen[m] = true; table.insert(mods, m) end
end
if ARGV[1] ~= '' and not seen[ARGV[1]] then table.insert(mods, ARGV[1]) end
table.sort(mods)
redis.call('HSET', h, 'modalities', table.concat(mods, ','))
redis.call('HSET', h, 'n_instances', redis.call('SCARD', KEYS[2]))
local last = tonumber(redis.call('HGET', h, 'last_instance_at') or '0')
if tonumber(ARGV[2]) > last then
  redis.call('HSET', h, 'last_instance_at', ARGV[2])
end
return redis.call('HGET', h, 'last_instance_at')
"""

# KEYS: study queued set (zset SOPInstanceUID -> reception time), ingest payload hash, the previous
# release's study queued set (a plain set). ARGV: how many members to check at each end.
# Returns {instances still queued, the latest reception time among them}, in O(ARGV[1] log n): the
# count and the latest are the sorted set's own. The oldest and newest few members are checked for
# their payload, and dropped without one (settled by a path that did not know its study, or lost with
# its hint), so that a lost hint cannot hold a study's pooling back (one in the middle is bounded by
# ``study_queue_wait_seconds``). The previous release's set, where one is left, is moved in first.
QUEUED_IN_STUDY = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  for _, sop in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local p = redis.call('HGET', KEYS[2], sop)
    if p then redis.call('ZADD', KEYS[1], tonumber(cjson.decode(p)['received_at']) or 0, sop) end
  end
  redis.call('DEL', KEYS[3])
end
local k = tonumber(ARGV[1])
for _, ends in ipairs({{0, k - 1}, {-k, -1}}) do
  for _, sop in ipairs(redis.call('ZRANGE', KEYS[1], ends[1], ends[2])) do
    if redis.call('HEXISTS', KEYS[2], sop) == 0 then redis.call('ZREM', KEYS[1], sop) end
  end
end
local n = redis.call('ZCARD', KEYS[1])
if n == 0 then return {0, '0'} end
return {n, redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]}
"""

# KEYS: pool due (zset uid -> due time), pool running (zset uid -> lease end). ARGV: now, lease end,
# limit. Studies whose lease ran out (their worker died, or its message was lost) are due again at
# once, unless a late instance made them due later; then up to ``limit`` due studies not being
# pooled right now move to running with a lease, and are returned.
CLAIM_POOLING = """
local now = tonumber(ARGV[1])
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], uid)
  redis.call('ZADD', KEYS[1], 'GT', now, uid)
end
local window = tonumber(ARGV[3]) + redis.call('ZCARD', KEYS[2])
local out = {}
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, window)) do
  if #out >= tonumber(ARGV[3]) then break end
  if not redis.call('ZSCORE', KEYS[2], uid) then
    redis.call('ZREM', KEYS[1], uid)
    redis.call('ZADD', KEYS[2], ARGV[2], uid)
    out[#out + 1] = uid
  end
end
return out
"""


# KEYS: a study's instance set, a version's variants hash. ARGV: how many instances at most.
# The stored query variants of the study's first instances in UID order (byte order, as Python's
# sorted), in one round trip where SMEMBERS and then HMGET took two: a read, for a query's reference.
STUDY_VARIANTS = """
local sops = redis.call('SMEMBERS', KEYS[1])
if #sops == 0 then return {} end
table.sort(sops)
local first = {}
for i = 1, math.min(#sops, tonumber(ARGV[1])) do first[i] = sops[i] end
return redis.call('HMGET', KEYS[2], unpack(first))
"""
