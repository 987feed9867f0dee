-- Put a failed callback back in the callback queue (POST /retry/<id>).
-- KEYS[1] job hash   KEYS[2] callback queue
-- KEYS[3] optional: the failed-callbacks index the job leaves
-- ARGV[1] job id     ARGV[2] due (ms)   ARGV[3] wake channel
-- Returns 1 when queued, 0 for an unknown job, -1 when its callback has not failed.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('HGET', KEYS[1], 'callback_state') ~= 'failed' then
  return -1
end
redis.call('HSET', KEYS[1], 'callback_state', 'queued', 'callback_attempts', 0, 'callback_error', '')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if KEYS[3] then
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
