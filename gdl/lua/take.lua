-- Take up to ARGV[2] due jobs from a queue into an in-flight set, in one step:
-- from the moment a job leaves its queue, Redis knows who holds it and until when.
-- Every key is declared (Redis Cluster), so the caller names the jobs it
-- expects to take (the queue's head as the previous take saw it): each is
-- taken if it is still in the queue and due; the reply shows the queue's head
-- now, for the next call.
-- KEYS[1] queue (sorted by due ms)   KEYS[2] in-flight set (sorted by deadline ms)
-- with ARGV[7] (an aggregation queue):
--   KEYS[3] the due index, kept in step with KEYS[1]
--   KEYS[4] the aggregation hash: limit, and the shaping fields that gate the take
--   KEYS[5] the aggregation's lease, the fence
--   KEYS[6] the aggregation's rate state: the GCRA theoretical arrival time (us)
-- then the job hash of each candidate, in the order of ARGV[11..]
-- ARGV[1] now (ms)        ARGV[2] most jobs to take    ARGV[3] deadline (ms)
-- ARGV[4] owner token     ARGV[5] state field to set   ARGV[6] its value
-- ARGV[7] the aggregation id ('' for the callback queue)
-- ARGV[8] with ARGV[7]: the lease's time to live (ms)
-- ARGV[9] how many of the queue's head to return
-- ARGV[10] with ARGV[7]: downloads the caller's pool has in flight (for the effective limit)
-- ARGV[11..] candidate job ids
-- Returns {next due (ms, '' when the queue is empty or the aggregation paused),
--          {limit, effective limit, gate, the GCRA time it wrote ('' for none)} ('' without ARGV[7]),
--          {the queue's first ARGV[9] ids}, id, {job hash}, id, {job hash}, ...}
-- gate says what held the take back: '' nothing, 'paused' (operator), 'throttled'
-- (the origin's Retry-After: until paused_until), 'capped' (the adaptive limit is
-- in use), 'rate' (the GCRA has no start left now). With a rate or a throttle the
-- next due time is the earliest the next start may come, never earlier, so the
-- caller sleeps until then and the due index keeps the scanner from claiming early.
-- Returns -1, taking nothing, when the lease is not held by ARGV[4]: a pool whose
-- lease lapsed (Redis was away, or its process stalled) must start nothing,
-- since another process may run the aggregation already. A take that passes
-- the fence extends the lease, so what it starts is covered for a full ttl.
local aggr = ARGV[7] ~= ''
local first_job_key = 3
local out = {'', '', {}}
local now = tonumber(ARGV[1])
local room = tonumber(ARGV[2])
local gate = ''
local not_before = 0         -- ms: the earliest next start (throttle or rate)
local period, tau, t0        -- us: the GCRA's emission interval, tolerance and start
if aggr then
  if redis.call('GET', KEYS[5]) ~= ARGV[4] then
    return -1
  end
  redis.call('PEXPIRE', KEYS[5], ARGV[8])
  first_job_key = 7
  local a = redis.call('HMGET', KEYS[4], 'limit', 'paused', 'paused_until', 'rate', 'burst', 'adaptive', 'eff')
  local limit = tonumber(a[1]) or 0
  local cap = limit
  if a[6] == '1' and a[7] then
    cap = math.max(1, math.min(limit, math.floor(tonumber(a[7]))))
  end
  local paused_until = tonumber(a[3]) or 0
  if a[2] == '1' then
    gate, room = 'paused', 0
  elseif paused_until > now then
    gate, room, not_before = 'throttled', 0, paused_until
  else
    local free = math.max(0, cap - tonumber(ARGV[10]))
    if a[6] == '1' and free < room then
      gate, room = 'capped', free
    end
    local rate = tonumber(a[4]) or 0
    if rate > 0 then
      period = math.ceil(1e6 / rate)
      tau = ((tonumber(a[5]) or 1) - 1) * period
      local now_us = now * 1000
      t0 = math.max(tonumber(redis.call('GET', KEYS[6]) or 0), now_us)
      local starts = 0
      if t0 - now_us <= tau then
        starts = math.floor((tau - (t0 - now_us)) / period) + 1
      end
      if starts < room then
        gate, room = 'rate', starts
      end
    end
  end
  out[2] = {tostring(limit), tostring(cap), gate, ''}
end
local taken = 0
for i = 11, #ARGV do
  if room == 0 then
    break
  end
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= now then
    redis.call('ZREM', KEYS[1], id)
    local key = KEYS[first_job_key + i - 11]
    -- A queue entry whose job is gone (reaped by an operator) is dropped.
    if redis.call('EXISTS', key) == 1 then
      redis.call('ZADD', KEYS[2], ARGV[3], id)
      redis.call('HSET', key, ARGV[5], ARGV[6], 'owner', ARGV[4])
      table.insert(out, id)
      table.insert(out, redis.call('HGETALL', key))
      room = room - 1
      taken = taken + 1
    end
  end
end
if period then
  local tat = t0 + taken * period
  if taken > 0 then
    -- Expiry means "TAT = now", the idle state: the key holds only a future TAT.
    out[2][4] = string.format('%.0f', tat)
    redis.call('SET', KEYS[6], out[2][4], 'PX', math.ceil((tat - now * 1000) / 1000))
  end
  not_before = math.max(not_before, math.ceil((tat - tau) / 1000))
end
local head = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[9]) - 1, 'WITHSCORES')
for i = 1, #head, 2 do
  table.insert(out[3], head[i])
end
if head[1] and gate ~= 'paused' then
  out[1] = string.format('%.0f', math.max(tonumber(head[2]), not_before))
end
if aggr then
  if out[1] ~= '' then
    redis.call('ZADD', KEYS[3], out[1], ARGV[7])
  else
    redis.call('ZREM', KEYS[3], ARGV[7])
  end
end
return out
