-- An operator pauses an aggregation: nothing of it is taken until resumed
-- (take.lua reads the flag at its next call; downloads in flight finish). The
-- record is kept however long the pause lasts (release_lease.lua leaves it), the
-- aggregation leaves the due index (no scanner claims it for nothing) and is
-- listed in the paused set (the views). Pausing an aggregation gdl has not
-- seen yet is allowed: its jobs wait.
-- KEYS[1] aggr:<aggr>   KEYS[2] due index   KEYS[3] paused set
-- ARGV[1] aggregation id
redis.call('HSET', KEYS[1], 'paused', '1')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
