-- Remember a stored result for reuse: replace the request's record in one step
-- (no reader sees fields of two results) and give it its lifetime.
-- KEYS[1] the request's reuse record (hash)
-- ARGV[1] lifetime (ms, PEXPIRE)   ARGV[2..] the record's fields as field, value pairs
-- Returns 1.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
