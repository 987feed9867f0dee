-- Take up to ARGV[2] due jobs from a queue into an in-flight set, in one step:
-- from the moment a job leaves its queue, Redis knows who holds it and until when.
-- Every key is declared (Redis Cluster), so the caller names the jobs it
-- expects to take (the queue's head as the previous take saw it): each is
-- taken if it is still in the queue and due; the reply shows the queue's head
-- now, for the next call.
-- KEYS[1] queue (sorted by due ms)   KEYS[2] in-flight set (sorted by deadline ms)
-- with ARGV[7] (an aggregation queue):
--   KEYS[3] the due index, kept in step with KEYS[1]
--   KEYS[4] the aggregation hash, whose current limit is returned
--   KEYS[5] the aggregation's lease, the fence
-- then the job hash of each candidate, in the order of ARGV[10..]
-- ARGV[1] now (ms)        ARGV[2] most jobs to take    ARGV[3] deadline (ms)
-- ARGV[4] owner token     ARGV[5] state field to set   ARGV[6] its value
-- ARGV[7] the aggregation id ('' for the callback queue)
-- ARGV[8] with ARGV[7]: the lease's time to live (ms)
-- ARGV[9] how many of the queue's head to return     ARGV[10..] candidate job ids
-- Returns {next due (ms, '' when the queue is empty), limit ('' without ARGV[7]),
--          {the queue's first ARGV[9] ids}, id, {job hash}, id, {job hash}, ...}
-- or -1, taking nothing, when the lease is not held by ARGV[4]: a pool whose
-- lease lapsed (Redis was away, or its process stalled) must start nothing,
-- since another process may run the aggregation already. A take that passes
-- the fence extends the lease, so what it starts is covered for a full ttl.
local aggr = ARGV[7] ~= ''
local first_job_key = 3
local out = {'', '', {}}
if aggr then
  if redis.call('GET', KEYS[5]) ~= ARGV[4] then
    return -1
  end
  redis.call('PEXPIRE', KEYS[5], ARGV[8])
  out[2] = redis.call('HGET', KEYS[4], 'limit') or ''
  first_job_key = 6
end
local now = tonumber(ARGV[1])
local room = tonumber(ARGV[2])
for i = 10, #ARGV do
  if room == 0 then
    break
  end
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= now then
    redis.call('ZREM', KEYS[1], id)
    local key = KEYS[first_job_key + i - 10]
    -- A queue entry whose job is gone (reaped by an operator) is dropped.
    if redis.call('EXISTS', key) == 1 then
      redis.call('ZADD', KEYS[2], ARGV[3], id)
      redis.call('HSET', key, ARGV[5], ARGV[6], 'owner', ARGV[4])
      table.insert(out, id)
      table.insert(out, redis.call('HGETALL', key))
      room = room - 1
    end
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[9]) - 1, 'WITHSCORES')
for i = 1, #head, 2 do
  table.insert(out[3], head[i])
end
if head[1] then
  out[1] = head[2]
end
if aggr then
  if head[1] then
    redis.call('ZADD', KEYS[3], head[2], ARGV[7])
  else
    redis.call('ZREM', KEYS[3], ARGV[7])
  end
end
return out
