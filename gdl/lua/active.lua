-- Forget an aggregation in the active-pools hash, only if the entry is stale.
-- The scanner records ``aggr -> owner`` when it claims a lease (claim.lua) and
-- drops it when its pool ends (release_lease.lua); an entry outlives its pool
-- when a process dies, so readers prune it here, atomically against a new
-- claim (which sets the lease and the entry in one step).
-- KEYS[1] active hash   KEYS[2] lease:<aggr>
-- ARGV[1] aggregation id
-- Returns 1 when the entry was dropped (its owner no longer holds the lease), else 0.
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if not owner or redis.call('GET', KEYS[2]) == owner then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
