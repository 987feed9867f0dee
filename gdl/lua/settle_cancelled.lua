-- Settle a download whose cancel was requested (cancel.lua marked it): it
-- leaves the in-flight set and ends cancelled, with its callback queued
-- unless the cancel asked for none (or the job has no callback), in one step.
-- Run by the holder once it aborted the download (or found the mark when
-- settling any other outcome, which settle.lua refuses for a marked job), or
-- by the sweep for a marked job whose holder died (ARGV[2] ''; then only a
-- job whose deadline, ARGV[3], has passed is settled).
-- KEYS[1] job hash   KEYS[2] in-flight set   KEYS[3] job log list
-- KEYS[4] the callback queue   KEYS[5] the deletion queue   KEYS[6] the cancel counters
-- KEYS[7] the aggregation's lease, the fence (ARGV[2] not '')
-- ARGV[1] job id   ARGV[2] owner token ('' for the sweep)   ARGV[3] now (ms)
-- ARGV[4] when a job with no callback is forgotten (ms)   ARGV[5] log entry ('' for none)
-- ARGV[6] the callbacks' wake channel
-- Returns 1; 0 when the job is not ours (or, for the sweep, not expired or not
-- marked); -1 when the caller no longer holds the aggregation's lease.
local job = KEYS[1]
if ARGV[2] ~= '' then
  if redis.call('GET', KEYS[7]) ~= ARGV[2] then
    return -1
  end
  if redis.call('HGET', job, 'owner') ~= ARGV[2] then
    return 0
  end
else
  local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if not deadline or tonumber(deadline) > tonumber(ARGV[3]) then
    return 0
  end
end
local found = redis.call('HMGET', job, 'cancel', 'cancel_reason', 'callback_type')
if not found[1] or redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', job, 'owner')
redis.call('HSET', job, 'state', 'cancelled', 'error', found[2] or 'cancelled', 'finished_at', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[5])
end
if found[1] == '1' and found[3] and found[3] ~= '' then
  redis.call('HSET', job, 'callback_state', 'queued')
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
  redis.call('PUBLISH', ARGV[6], ARGV[1])
else
  redis.call('HSET', job, 'callback_state', 'none')
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
end
redis.call('HINCRBY', KEYS[6], 'in_flight', 1)
return 1
