-- Take up to ARGV[2] due jobs from a queue into an in-flight set, in one step:
-- from the moment a job leaves its queue, Redis knows who holds it and until when.
-- KEYS[1] queue (sorted by due ms)   KEYS[2] in-flight set (sorted by deadline ms)
-- KEYS[3] optional: due index to keep in step with KEYS[1] (aggregation queues)
-- KEYS[4] optional: the aggregation hash, whose current limit is returned
-- KEYS[5] optional: the aggregation's lease, the fence (aggregation queues)
-- ARGV[1] now (ms)        ARGV[2] most jobs to take    ARGV[3] deadline (ms)
-- ARGV[4] owner token     ARGV[5] job key prefix       ARGV[6] state field to set
-- ARGV[7] its value       ARGV[8] member of KEYS[3] (the aggregation id)
-- ARGV[9] with KEYS[5]: the lease's time to live (ms)
-- Returns {next due (ms, '' when the queue is empty), limit ('' without KEYS[4]),
--          id, {job hash}, id, {job hash}, ...}
-- or -1, taking nothing, when KEYS[5] is not held by ARGV[4]: a pool whose
-- lease lapsed (Redis was away, or its process stalled) must start nothing,
-- since another process may run the aggregation already. A take that passes
-- the fence extends the lease, so what it starts is covered for a full ttl.
if KEYS[5] then
  if redis.call('GET', KEYS[5]) ~= ARGV[4] then
    return -1
  end
  redis.call('PEXPIRE', KEYS[5], ARGV[9])
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {'', ''}
if KEYS[4] then
  out[2] = redis.call('HGET', KEYS[4], 'limit') or ''
end
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[5] .. id
  -- A queue entry whose job is gone (reaped by an operator) is dropped.
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    redis.call('HSET', key, ARGV[6], ARGV[7], 'owner', ARGV[4])
    table.insert(out, id)
    table.insert(out, redis.call('HGETALL', key))
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if head[1] then
  out[1] = head[2]
end
if KEYS[3] then
  if head[1] then
    redis.call('ZADD', KEYS[3], head[2], ARGV[8])
  else
    redis.call('ZREM', KEYS[3], ARGV[8])
  end
end
return out
