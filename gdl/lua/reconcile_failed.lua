-- fsck --fix: make one job's membership of the failed-callbacks index agree
-- with its callback_state (jobs whose callback failed before the index existed,
-- or entries whose job moved on or is gone).
-- KEYS[1] job hash   KEYS[2] failed-callbacks index
-- ARGV[1] job id     ARGV[2] score (failed at, ms) for a job added
-- Returns 1 when added, -1 when removed, 0 when already right.
local state = redis.call('HGET', KEYS[1], 'callback_state')
local listed = redis.call('ZSCORE', KEYS[2], ARGV[1])
if state == 'failed' then
  if listed then
    return 0
  end
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
if listed then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return -1
end
return 0
