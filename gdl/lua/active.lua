-- Forget an aggregation in the active-pools hash, only if the entry is stale.
-- The scanner records ``aggr -> owner`` when it claims a lease; an entry
-- outlives its pool when a process dies, so it is dropped here, atomically
-- against a new claim (which sets the lease before writing the entry).
-- KEYS[1] active hash   KEYS[2] lease:<aggr>
-- ARGV[1] aggregation id
-- ARGV[2] owner: drop the entry only if it is this owner's (a pool ending);
--         '' : drop it only if its owner no longer holds the lease (a reader pruning)
-- Returns 1 when the entry was dropped, else 0.
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if not owner then
  return 0
end
if ARGV[2] ~= '' then
  if owner ~= ARGV[2] then
    return 0
  end
elseif redis.call('GET', KEYS[2]) == owner then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
