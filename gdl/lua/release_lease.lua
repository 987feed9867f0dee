-- A pool ended: drop its aggregation's lease if, and only if, the caller still
-- holds it; its entry in the active-pools hash if it is the caller's. Once the
-- queue is empty the aggregation's record (limit, proxy and shaping state) is
-- kept ARGV[3] ms more (processor.aggr_state_ttl), so that a throttle, an
-- adaptive limit or a rate outlives a drain and refill; an operator's pause is
-- kept until resumed. Only the lease holder runs an aggregation, so an ended
-- pool has settled all its jobs: none is in flight, and the next enqueue
-- keeps the record again (enqueue.lua).
-- KEYS[1] lease:<aggr>   KEYS[2] active hash   KEYS[3] queue:<aggr>   KEYS[4] aggr:<aggr>
-- ARGV[1] owner token    ARGV[2] aggregation id   ARGV[3] the record's time to live (ms)
-- Returns 1 when the lease was released, 0 when it had passed to another owner.
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if redis.call('ZCARD', KEYS[3]) == 0 and redis.call('HGET', KEYS[4], 'paused') ~= '1' then
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return 1
