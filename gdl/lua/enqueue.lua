-- Enqueue one job and record its aggregation, in one step: a job is never
-- visible without its aggregation, its queue entry and the due index entry.
-- KEYS[1] job hash          KEYS[2] aggregation hash
-- KEYS[3] aggregation queue KEYS[4] due index
-- ARGV[1] job id   ARGV[2] aggr id   ARGV[3] aggr limit   ARGV[4] aggr proxy
-- ARGV[5] due (ms) ARGV[6] wake channel
-- ARGV[7..] the job hash as field, value pairs
-- Returns 1, or 0 when the id is taken (nothing written; the caller draws again).
-- The wake-up is published only when the queue had nothing due by now: if it
-- had, its pool is running and takes this job when a slot frees, and a
-- message per job would cost every listening process a wake for nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('HSET', KEYS[2], 'limit', ARGV[3], 'proxy', ARGV[4])
local head = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], 'LT', ARGV[5], ARGV[2])
if not head[2] or tonumber(head[2]) > tonumber(ARGV[5]) then
  redis.call('PUBLISH', ARGV[6], ARGV[2])
end
return 1
