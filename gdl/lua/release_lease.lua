-- Drop a lease if, and only if, the caller still holds it, and with KEYS[2]
-- the aggregation's entry in the active-pools hash if it is the caller's.
-- KEYS[1] lease key   KEYS[2] optional: active hash
-- ARGV[1] owner token ARGV[2] aggregation id (with KEYS[2])
-- Returns 1 when the lease was released, 0 when it had passed to another owner.
if KEYS[2] and redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
