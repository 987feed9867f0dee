-- Forget jobs whose deletion time has come, after the reaper deleted their files.
-- KEYS[1] deletion queue
-- ARGV[1] now (ms)   ARGV[2] job key prefix   ARGV[3] job log key suffix
-- ARGV[4..] job ids
-- Returns how many jobs were forgotten (ids no longer due are left alone).
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('DEL', ARGV[2] .. id, ARGV[2] .. id .. ARGV[3])
    n = n + 1
  end
end
return n
