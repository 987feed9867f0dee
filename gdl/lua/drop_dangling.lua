-- fsck --fix: drop members of a job set whose job record is gone, and keep
-- the due index in step when the set is an aggregation queue.
-- KEYS[1] sorted set of job ids (a queue, an in-flight set, callbacks, deletions)
-- KEYS[2] the due index, set to the queue's head afterwards ('' ARGV[1]: unused)
-- KEYS[3..] the job hashes of ARGV[2..], in that order
-- ARGV[1] aggregation id (member of KEYS[2]; '' when KEYS[1] is not a queue)
-- ARGV[2..] job ids to check (each dropped only if its job hash does not exist)
-- Returns how many members were dropped.
local dropped = 0
for i = 2, #ARGV do
  if redis.call('EXISTS', KEYS[1 + i]) == 0 then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
if ARGV[1] ~= '' then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if head[1] then
    redis.call('ZADD', KEYS[2], head[2], ARGV[1])
  else
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
end
return dropped
