-- An operator resumes an aggregation: the flag goes, the due index gets the
-- queue's head back and a wake is published, so that the pool that holds the
-- lease (or any scanner) takes work at once. With nothing queued and no pool,
-- the record expires ARGV[4] ms later as after any last job (release_lease.lua).
-- KEYS[1] aggr:<aggr>   KEYS[2] due index   KEYS[3] paused set   KEYS[4] queue:<aggr>
-- KEYS[5] lease:<aggr>
-- ARGV[1] aggregation id   ARGV[2] now (ms)   ARGV[3] wake channel   ARGV[4] record's ttl (ms)
-- Returns 1; 0 when gdl has no record of the aggregation.
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[1], 'paused')
local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if head[2] then
  redis.call('ZADD', KEYS[2], head[2], ARGV[1])
  redis.call('PUBLISH', ARGV[3], ARGV[1])
elseif redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
