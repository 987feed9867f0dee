-- Claim an aggregation for a pool, in one step: its lease, its settings and
-- its entry in the active-pools hash (see active.lua).
-- KEYS[1] lease:<aggr>   KEYS[2] aggr:<aggr> hash   KEYS[3] active hash
-- ARGV[1] owner token    ARGV[2] lease ttl (ms)     ARGV[3] aggregation id
-- Returns {limit, proxy}; 0 when another process holds the lease; -1 when
-- the aggregation has no record (queue entries without one: nothing to run,
-- and no lease is kept).
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
local settings = redis.call('HMGET', KEYS[2], 'limit', 'proxy')
if not settings[1] then
  redis.call('DEL', KEYS[1])
  return -1
end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
return {settings[1], settings[2] or ''}
