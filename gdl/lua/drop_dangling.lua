-- fsck --fix: drop members of a job set whose job record is gone, and keep
-- the due index in step when the set is an aggregation queue.
-- KEYS[1] sorted set of job ids (a queue, an in-flight set, callbacks, deletions)
-- KEYS[2] optional: the due index, set to the queue's head afterwards
-- ARGV[1] job key prefix   ARGV[2] aggregation id (member of KEYS[2])
-- ARGV[3..] job ids to check (each dropped only if its job hash does not exist)
-- Returns how many members were dropped.
local dropped = 0
for i = 3, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
if KEYS[2] then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if head[1] then
    redis.call('ZADD', KEYS[2], head[2], ARGV[2])
  else
    redis.call('ZREM', KEYS[2], ARGV[2])
  end
end
return dropped
