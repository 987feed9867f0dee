-- Enqueue jobs of one aggregation and record the aggregation, in one step: a
-- job is never visible without its aggregation, its queue entry and the due
-- index entry. Each job's idempotency record is checked and written in the
-- same step, so that requests with one key, through any number of API
-- processes, create exactly one job.
-- KEYS[1] aggregation hash   KEYS[2] aggregation queue   KEYS[3] due index
-- KEYS[4] the aggregation's rate state (GCRA TAT, us; see take.lua)
-- then for job i: KEYS[3 + 2i] its hash, KEYS[4 + 2i] its idempotency record
--   (a key of its own even for a job without one: every key is declared)
-- ARGV[1] aggr id   ARGV[2] due (ms)   ARGV[3] wake channel   ARGV[4] records' ttl (ms)
-- ARGV[5] the jobs, one JSON array in KEYS' order; job i is the array {id,
--   fingerprint ('' for no idempotency key), aggr limit, aggr proxy, the job hash
--   as an object of strings} (one argument for them all rather than five a job:
--   the client's cost of sending a job, to encode and to pack, is per argument)
-- Returns one reply per job: 1 created (or found created by this same call sent
-- before); 0 when the id is taken by another job (nothing written; the caller
-- draws again); {2, id} when its record names a job made
-- by the same request (a replay); {3, id} when it names one made by another
-- request. The aggregation's limit and proxy are the last created job's; its
-- rate, burst and adaptive flag the last created job's that gave them (a job
-- that leaves them out keeps them: a Go client never wipes them).
-- The due index gets the jobs' due time, or later: not while an operator paused
-- the aggregation (resume restores it), not before a throttle's end or the
-- rate's next start, so that no scanner claims the aggregation early for nothing.
-- The wake-up is published only when the queue had nothing due by then: if it
-- had, its pool is running and takes these jobs when slots free, and a
-- message per job would cost every listening process a wake for nothing.
-- The job fields aggr_rate, aggr_burst and aggr_adaptive onto the aggregation (0 clears a rate).
local function record_shaping(spec)
  if spec.aggr_rate then
    if tonumber(spec.aggr_rate) > 0 then
      redis.call('HSET', KEYS[1], 'rate', spec.aggr_rate)
    else
      redis.call('HDEL', KEYS[1], 'rate')
    end
  end
  if spec.aggr_burst then
    redis.call('HSET', KEYS[1], 'burst', spec.aggr_burst)
  end
  if spec.aggr_adaptive == '1' then
    redis.call('HSET', KEYS[1], 'adaptive', '1')
  elseif spec.aggr_adaptive then
    redis.call('HDEL', KEYS[1], 'adaptive', 'eff', 'aimd_at')
  end
end

-- When the aggregation may start its next job due at ``due``: nil while paused.
local function first_start(due)
  local a = redis.call('HMGET', KEYS[1], 'paused', 'paused_until', 'rate', 'burst')
  if a[1] == '1' then
    return nil
  end
  due = math.max(due, tonumber(a[2]) or 0)
  local rate = tonumber(a[3]) or 0
  local tat = tonumber(redis.call('GET', KEYS[4]) or 0)
  if rate > 0 and tat > 0 then
    local period = math.ceil(1e6 / rate)
    due = math.max(due, math.ceil((tat - ((tonumber(a[4]) or 1) - 1) * period) / 1000))
  end
  return due
end

local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local replies = {}
-- What the created jobs add to the queue and to the aggregation, written once
-- after the loop (one ZADD for them all, one HSET): nothing in the loop reads them.
local queued = {}
local settings = nil
for i, spec in ipairs(cjson.decode(ARGV[5])) do
  local id, fingerprint = spec[1], spec[2]
  local job = KEYS[3 + 2 * i]
  local record = KEYS[4 + 2 * i]
  local reply = nil
  if fingerprint ~= '' then
    local seen = redis.call('HMGET', record, 'id', 'fingerprint')
    if seen[1] then
      reply = {seen[2] == fingerprint and 2 or 3, seen[1]}
    end
  end
  if not reply and redis.call('EXISTS', job) == 1 then
    -- This very job, written by a call whose reply was lost (the client sent the
    -- call again on a new connection): created, not to be drawn again as a copy.
    local mine = redis.call('HMGET', job, 'url', 'created_at')
    if mine[1] == spec[5].url and mine[2] == spec[5].created_at then
      reply = 1
    else
      reply = 0
    end
  end
  if not reply then
    local flat = {}
    for field, value in pairs(spec[5]) do
      flat[#flat + 1] = field
      flat[#flat + 1] = value
    end
    redis.call('HSET', job, unpack(flat))
    record_shaping(spec[5])
    settings = spec
    queued[#queued + 1] = ARGV[2]
    queued[#queued + 1] = id
    if fingerprint ~= '' then
      redis.call('HSET', record, 'id', id, 'fingerprint', fingerprint)
      redis.call('PEXPIRE', record, ARGV[4])
    end
    reply = 1
  end
  replies[i] = reply
end
if settings then
  redis.call('HSET', KEYS[1], 'limit', settings[3], 'proxy', settings[4])
  redis.call('PERSIST', KEYS[1])  -- kept while jobs wait (release_lease.lua gives it a ttl)
  redis.call('ZADD', KEYS[2], unpack(queued))
  local due = first_start(tonumber(ARGV[2]))
  if due then
    redis.call('ZADD', KEYS[3], 'LT', due, ARGV[1])
    if not head[2] or tonumber(head[2]) > due then
      redis.call('PUBLISH', ARGV[3], ARGV[1])
    end
  end
end
return replies
