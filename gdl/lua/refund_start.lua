-- Give back the rate start a take charged for a job that then made no request
-- to the origin (answered from a stored copy: reuse). Exact, or not at all: the
-- start is given back only if the GCRA time is still the one the caller's last
-- take (or refund) wrote, so that nothing admitted since depended on it; then
-- the time is what the take would have written without that job.
-- KEYS[1] the aggregation's rate state (take.lua's KEYS[6])   KEYS[2] the aggregation hash
-- ARGV[1] now (ms)    ARGV[2] the GCRA time (us) the caller expects, as take.lua wrote it
-- Returns {1, the GCRA time now ('' when back to idle)}, or {0} when refused.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return {0}
end
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or 0) or 0
if rate <= 0 then
  return {0}
end
local tat = tonumber(ARGV[2]) - math.ceil(1e6 / rate)
local now_us = tonumber(ARGV[1]) * 1000
if tat <= now_us then
  redis.call('DEL', KEYS[1])
  return {1, ''}
end
local written = string.format('%.0f', tat)
redis.call('SET', KEYS[1], written, 'PX', math.ceil((tat - now_us) / 1000))
return {1, written}
