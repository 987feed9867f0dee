-- Claim an aggregation for a pool, in one step: its lease, its settings and
-- its entry in the active-pools hash (see active.lua).
--
-- With ARGV[6] = '1' the claim is fair: when other processors are registered
-- (processors zset, by register_processor), a processor whose pools already
-- hold more than its share of all processors' download slots leaves the
-- aggregation to one below its share. The caller claims again without the
-- check a moment later, so work is never left unclaimed when the others do
-- not take it. Registrations that lapsed are dropped here.
-- KEYS[1] lease:<aggr>   KEYS[2] aggr:<aggr> hash   KEYS[3] active hash
-- KEYS[4] processors zset (owner -> registration expiry ms)
-- KEYS[5] processor_slots hash (owner -> download slots its pools hold)
-- ARGV[1] owner token    ARGV[2] lease ttl (ms)     ARGV[3] aggregation id
-- ARGV[4] now (ms)       ARGV[5] slots the caller's pools hold   ARGV[6] '1': fair
-- Returns {limit, proxy}; 0 when a process holds the lease; -1 when the
-- aggregation has no record (queue entries without one: nothing to run, and
-- no lease is kept); -2 when the caller is over its share (fair claims only).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local settings = redis.call('HMGET', KEYS[2], 'limit', 'proxy')
if not settings[1] then
  return -1
end
local limit = tonumber(settings[1])
local mine = tonumber(ARGV[5])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[4])
if #lapsed > 0 then
  redis.call('ZREM', KEYS[4], unpack(lapsed))
  redis.call('HDEL', KEYS[5], unpack(lapsed))
end
local registered = redis.call('ZSCORE', KEYS[4], ARGV[1])
if ARGV[6] == '1' and registered then
  local live = redis.call('ZCARD', KEYS[4])
  if live > 1 then
    local total = mine
    local slots = redis.call('HGETALL', KEYS[5])
    for i = 1, #slots, 2 do
      if slots[i] ~= ARGV[1] then
        total = total + tonumber(slots[i + 1])
      end
    end
    -- Over its share once this aggregation is counted in (a share may run
    -- one aggregation over, so that equals always make progress).
    if mine > (total + limit) / live then
      return -2
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
if registered then
  redis.call('HSET', KEYS[5], ARGV[1], mine + limit)
end
return {settings[1], settings[2] or ''}
