-- Settle an in-flight job: write its outcome and move it on, in one step.
-- Used for every outcome: download succeeded, failed, retried or put back;
-- callback delivered, failed or retried.
-- KEYS[1] job hash   KEYS[2] in-flight set it leaves   KEYS[3] job log list
-- KEYS[4] optional: sorted set it enters (queue, callbacks, deletions)
-- KEYS[5] optional: due index to lower for ARGV[5] (aggregation queues)
-- KEYS[#KEYS] with ARGV[8] = '1': the aggregation's lease, the fence
-- ARGV[1] job id     ARGV[2] owner token    ARGV[3] score in KEYS[4] (ms)
-- ARGV[4] log entry ('' for none)           ARGV[5] aggregation id
-- ARGV[6] wake channel ('' for none)        ARGV[7] wake message
-- ARGV[8] '1': fenced by the lease (downloads), '0': not (callbacks)
-- ARGV[9..] status fields as field, value pairs
-- The wake-up is published only when KEYS[4] had nothing due by ARGV[3] (see
-- enqueue.lua: a queue with due work has a taker already).
-- Returns 1; 2 when the download's cancel was requested (nothing written);
-- 0 when the job is no longer ours (its deadline passed and the
-- sweep gave it to someone else); -1 when the caller no longer holds the
-- aggregation's lease. Then nothing is written: the job stays in flight
-- until its deadline and the sweep puts it back for the lease's holder.
local nkeys = #KEYS
if ARGV[8] == '1' then
  if redis.call('GET', KEYS[nkeys]) ~= ARGV[2] then
    return -1
  end
  nkeys = nkeys - 1
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0
end
-- Cancel: a download whose cancel was requested (cancel.lua, purge.lua) is
-- settled by settle_cancelled.lua, whatever this outcome is, a success
-- included: this is the one place deciding between a finishing download and
-- its cancel. Nothing is written; the caller is told with 2.
if ARGV[8] == '1' and redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then
  return 2
end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[1], 'owner')
if #ARGV >= 9 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 9))
end
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[4])
end
local wake = ARGV[6] ~= ''
if nkeys >= 4 then
  if wake then
    local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    wake = not head[2] or tonumber(head[2]) > tonumber(ARGV[3])
  end
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
end
if nkeys >= 5 then
  redis.call('ZADD', KEYS[5], 'LT', ARGV[3], ARGV[5])
end
if wake then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return 1
