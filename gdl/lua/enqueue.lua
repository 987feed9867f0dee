-- Enqueue one job and record its aggregation, in one step: a job is never
-- visible without its aggregation, its queue entry and the due index entry.
-- With an idempotency record (KEYS[5]) the check and the record are part of
-- the same step, so that requests with one key, through any number of API
-- processes, create exactly one job.
-- KEYS[1] job hash          KEYS[2] aggregation hash
-- KEYS[3] aggregation queue KEYS[4] due index
-- KEYS[5] optional: the idempotency record (hash: id, fingerprint)
-- ARGV[1] job id   ARGV[2] aggr id   ARGV[3] aggr limit   ARGV[4] aggr proxy
-- ARGV[5] due (ms) ARGV[6] wake channel
-- ARGV[7] with KEYS[5]: the request's fingerprint     ARGV[8] with KEYS[5]: the record's ttl (ms)
-- ARGV[9..] the job hash as field, value pairs
-- Returns 1 (created); 0 when the id is taken (nothing written; the caller
-- draws again); {2, id} when the record names a job made by the same request
-- (a replay: nothing written); {3, id} when it names one made by another
-- request (nothing written).
-- The wake-up is published only when the queue had nothing due by now: if it
-- had, its pool is running and takes this job when a slot frees, and a
-- message per job would cost every listening process a wake for nothing.
if KEYS[5] then
  local record = redis.call('HMGET', KEYS[5], 'id', 'fingerprint')
  if record[1] then
    if record[2] == ARGV[7] then
      return {2, record[1]}
    end
    return {3, record[1]}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('HSET', KEYS[2], 'limit', ARGV[3], 'proxy', ARGV[4])
local head = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], 'LT', ARGV[5], ARGV[2])
if not head[2] or tonumber(head[2]) > tonumber(ARGV[5]) then
  redis.call('PUBLISH', ARGV[6], ARGV[2])
end
if KEYS[5] then
  redis.call('HSET', KEYS[5], 'id', ARGV[1], 'fingerprint', ARGV[7])
  redis.call('PEXPIRE', KEYS[5], ARGV[8])
end
return 1
