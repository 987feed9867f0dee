-- Extend the leases one process holds, only where it still holds them.
-- KEYS[1..n] lease keys   ARGV[1] owner token   ARGV[2] time to live (ms)
-- Returns {least time to live (ms) any held lease had left before this
-- renewal, -1 when none was held; then the indexes (1-based) of the leases
-- that were lost}. The first number is the renewal's margin: how close the
-- process came to losing a lease.
local least = -1
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    local left = redis.call('PTTL', key)
    if least < 0 or left < least then
      least = left
    end
    redis.call('PEXPIRE', key, ARGV[2])
  else
    table.insert(lost, i)
  end
end
table.insert(lost, 1, least)
return lost
