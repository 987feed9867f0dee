-- Forget jobs whose deletion time has come, after the reaper deleted their files.
-- KEYS[1] deletion queue
-- KEYS[2..n+1] the job hashes   KEYS[n+2..2n+1] their log lists
-- ARGV[1] now (ms)   ARGV[2..n+1] the job ids
-- Returns how many jobs were forgotten (ids no longer due are left alone).
local n = #ARGV - 1
local forgotten = 0
for i = 1, n do
  local id = ARGV[1 + i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('DEL', KEYS[1 + i], KEYS[1 + n + i])
    forgotten = forgotten + 1
  end
end
return forgotten
