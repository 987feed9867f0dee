-- Extend the leases one process holds, only where it still holds them.
-- KEYS[1..n] lease keys   ARGV[1] owner token   ARGV[2] time to live (ms)
-- Returns the indexes (1-based) of the leases that were lost.
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    table.insert(lost, i)
  end
end
return lost
