-- Put back in-flight jobs whose deadline passed (their process died or lost
-- Redis for longer than a lease): due now, no attempt counted.
-- The caller read the expired ids (and, for downloads, their aggregations)
-- beforehand, so that every key is declared (Redis Cluster); each is put
-- back only if its deadline is still past here.
-- KEYS[1] in-flight set
-- KEYS[2] for downloads: the due index; for callbacks: the callback queue
-- KEYS[3..n+2] the job hashes       for downloads, KEYS[n+3..2n+2]: their aggregation queues
-- ARGV[1] now (ms)   ARGV[2] state field   ARGV[3] 'downloads' or 'callbacks'
-- ARGV[4] wake channel               ARGV[5..n+4] the job ids
-- for downloads, ARGV[n+5..2n+4]: their aggregation ids ('' for a job that is gone)
-- Returns the ids put back.
local n = (#KEYS - 2)
local downloads = ARGV[3] == 'downloads'
if downloads then
  n = n / 2
end
local now = tonumber(ARGV[1])
local swept = {}
for i = 1, n do
  local id = ARGV[4 + i]
  local deadline = redis.call('ZSCORE', KEYS[1], id)
  if deadline and tonumber(deadline) <= now then
    redis.call('ZREM', KEYS[1], id)
    local key = KEYS[2 + i]
    if redis.call('EXISTS', key) == 1 then
      redis.call('HDEL', key, 'owner')
      redis.call('HSET', key, ARGV[2], 'queued')
      if downloads then
        local aggr = ARGV[4 + n + i]
        redis.call('ZADD', KEYS[2 + n + i], ARGV[1], id)
        redis.call('ZADD', KEYS[2], 'LT', ARGV[1], aggr)
        redis.call('PUBLISH', ARGV[4], aggr)
      else
        redis.call('ZADD', KEYS[2], ARGV[1], id)
        redis.call('PUBLISH', ARGV[4], id)
      end
    end
    table.insert(swept, id)
  end
end
return swept
