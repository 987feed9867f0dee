-- Cancel jobs (DELETE /jobs/<id>, or a chunk of a purge), each in one step:
-- a queued job (due now, or waiting for a retry) leaves its queue and ends
-- cancelled with its callback queued (or, with no callback, its deletion
-- scheduled); a job in flight is marked and its holder told on ARGV[6]: the
-- holder aborts it and settles it cancelled (settle.lua refuses any other
-- outcome of a marked job, so a download finishing meanwhile never succeeds).
-- KEYS[1] the due index   KEYS[2] the callback queue   KEYS[3] the deletion queue
-- KEYS[4] the cancel counters (hash)   KEYS[5] the count of marks made (raised per new mark)
-- then for job i: KEYS[4 + 2i] its hash, KEYS[5 + 2i] the set it is queued in
--   (its aggregation's queue, or the purge set holding it)
-- ARGV[1] now (ms)   ARGV[2] when a job with no callback is forgotten (ms)
-- ARGV[3] '1': a callback for each cancelled job, '0': none
-- ARGV[4] the error the cancelled jobs report (contains "cancelled")
-- ARGV[5] the callbacks' wake channel   ARGV[6] the cancel channel (jobs in flight)
-- ARGV[7] the counter to add the jobs cancelled here to
-- ARGV[8] '1': KEYS[4 + 2i] is an aggregation queue whose due index entry is
--   kept in step (DELETE /jobs); '0': a purge set, out of the index
-- then for job i: ARGV[7 + 2i] its id, ARGV[8 + 2i] its aggregation id
-- Returns for each job the state it is in now: 'cancelled' (now or before),
-- 'cancelling' (in flight, marked), 'unknown', or the state it finished in.
local now = ARGV[1]
local replies = {}
local cancelled = 0
local wake = nil  -- a job whose callback was queued: one message wakes the notifiers for all
for i = 1, (#ARGV - 8) / 2 do
  local job = KEYS[4 + 2 * i]
  local queue = KEYS[5 + 2 * i]
  local id, aggr = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local found = redis.call('HMGET', job, 'state', 'callback_type')
  local state = found[1]
  redis.call('ZREM', queue, id)
  if not state then
    replies[i] = 'unknown'
  elseif state == 'queued' then
    if ARGV[8] == '1' then
      local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
      if head[1] then
        redis.call('ZADD', KEYS[1], 'XX', head[2], aggr)
      else
        redis.call('ZREM', KEYS[1], aggr)
      end
    end
    redis.call('HSET', job, 'state', 'cancelled', 'error', ARGV[4], 'finished_at', now)
    if ARGV[3] == '1' and found[2] and found[2] ~= '' then
      redis.call('HSET', job, 'callback_state', 'queued')
      redis.call('ZADD', KEYS[2], now, id)
      wake = id
    else
      redis.call('HSET', job, 'callback_state', 'none')
      redis.call('ZADD', KEYS[3], ARGV[2], id)
    end
    cancelled = cancelled + 1
    replies[i] = 'cancelled'
  elseif state == 'in_flight' then
    if redis.call('HSETNX', job, 'cancel', ARGV[3]) == 1 then
      redis.call('HSET', job, 'cancel_reason', ARGV[4])
      redis.call('INCR', KEYS[5])
    end
    redis.call('PUBLISH', ARGV[6], id)
    replies[i] = 'cancelling'
  else
    replies[i] = state
  end
end
if cancelled > 0 then
  redis.call('HINCRBY', KEYS[4], ARGV[7], cancelled)
end
if wake then
  redis.call('PUBLISH', ARGV[5], wake)
end
return replies
