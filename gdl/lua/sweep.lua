-- Put back in-flight jobs whose deadline passed (their process died or lost
-- Redis for longer than a lease): due now, no attempt counted.
-- KEYS[1] in-flight set
-- KEYS[2] for downloads: the due index; for callbacks: the callback queue
-- ARGV[1] now (ms)        ARGV[2] most jobs to sweep   ARGV[3] job key prefix
-- ARGV[4] aggregation queue key prefix (downloads only)
-- ARGV[5] state field     ARGV[6] 'downloads' or 'callbacks'   ARGV[7] wake channel
-- Returns the ids put back.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[3] .. id
  local aggr = redis.call('HGET', key, 'aggr_id')
  if aggr then
    redis.call('HDEL', key, 'owner')
    redis.call('HSET', key, ARGV[5], 'queued')
    if ARGV[6] == 'downloads' then
      redis.call('ZADD', ARGV[4] .. aggr, ARGV[1], id)
      redis.call('ZADD', KEYS[2], 'LT', ARGV[1], aggr)
      redis.call('PUBLISH', ARGV[7], aggr)
    else
      redis.call('ZADD', KEYS[2], ARGV[1], id)
      redis.call('PUBLISH', ARGV[7], id)
    end
  end
end
return ids
