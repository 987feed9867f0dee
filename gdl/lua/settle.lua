-- Settle an in-flight job: write its outcome and move it on, in one step.
-- Used for every outcome: download succeeded, failed, retried or put back;
-- callback delivered, failed or retried.
-- KEYS[1] job hash   KEYS[2] in-flight set it leaves   KEYS[3] job log list
-- KEYS[4] optional: sorted set it enters (queue, callbacks, deletions)
-- KEYS[5] optional: due index to lower for ARGV[5] (aggregation queues)
-- KEYS[#KEYS - 1] with ARGV[9] ~= '': the aggregation hash (traffic shaping)
-- KEYS[#KEYS] with ARGV[8] = '1': the aggregation's lease, the fence
-- ARGV[1] job id     ARGV[2] owner token    ARGV[3] score in KEYS[4] (ms)
-- ARGV[4] log entry ('' for none)           ARGV[5] aggregation id
-- ARGV[6] wake channel ('' for none)        ARGV[7] wake message
-- ARGV[8] '1': fenced by the lease (downloads), '0': not (callbacks)
-- ARGV[9] what the outcome says of the origin, as JSON ('' for nothing; see
--   shape() below and gdl/shaping.py)
-- ARGV[10..] status fields as field, value pairs
-- The wake-up is published only when KEYS[4] had nothing due by ARGV[3] (see
-- enqueue.lua: a queue with due work has a taker already).
-- Returns 1; 2 when the download's cancel was requested (nothing written);
-- 0 when the job is no longer ours (its deadline passed and the
-- sweep gave it to someone else); -1 when the caller no longer holds the
-- aggregation's lease. Then nothing is written: the job stays in flight
-- until its deadline and the sweep puts it back for the lease's holder.

-- Traffic shaping: the aggregation's throttle pause, header-less 429 streak and
-- adaptive limit, written in the step that records the outcome. The signal s:
-- {now, throttle = pause ms (-1: no Retry-After, the streak's) or nil,
--  congested, ok, busy, window, beta, min_pause, max_pause}.
-- KEYS[at] is the aggregation hash. Returns the throttle's end (ms; 0 when not paused).
local function shape(at, s)
  local aggr = KEYS[at]
  local now = s.now
  local a = redis.call('HMGET', aggr, 'limit', 'paused_until', 'streak', 'adaptive', 'eff', 'aimd_at')
  local paused_until = tonumber(a[2]) or 0
  if s.throttle then
    local pause = s.throttle
    if pause < 0 then
      -- The streak grows once per pause, not per response: a 429 within a pause adds nothing.
      pause = 0
      if paused_until <= now then
        local streak = redis.call('HINCRBY', aggr, 'streak', 1)
        pause = math.min(s.min_pause * 2 ^ (streak - 1), s.max_pause)
      end
    end
    if now + pause > paused_until then
      paused_until = now + pause
      redis.call('HSET', aggr, 'paused_until', string.format('%.0f', paused_until))
    end
  elseif s.ok and a[3] then
    redis.call('HDEL', aggr, 'streak')
  end
  if a[4] == '1' then
    local limit = tonumber(a[1]) or 1
    local eff = math.min(tonumber(a[5]) or limit, limit)
    if s.congested and now - (tonumber(a[6]) or 0) >= s.window then
      -- One cut per congestion event: responses within the window share it.
      eff = math.max(1, math.min(eff - 1, eff * s.beta))
      redis.call('HSET', aggr, 'eff', tostring(eff), 'aimd_at', now)
    elseif s.ok and s.busy * 2 >= math.floor(eff) then
      -- Grown only while in use: about +1 per window of successes.
      redis.call('HSET', aggr, 'eff', tostring(math.min(limit, eff + 1 / eff)))
    end
  end
  if paused_until > now then
    return paused_until
  end
  return 0
end

local nkeys = #KEYS
if ARGV[8] == '1' then
  if redis.call('GET', KEYS[nkeys]) ~= ARGV[2] then
    return -1
  end
  nkeys = nkeys - 1
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0
end
-- Cancel: a download whose cancel was requested (cancel.lua, purge.lua) is
-- settled by settle_cancelled.lua, whatever this outcome is, a success
-- included: this is the one place deciding between a finishing download and
-- its cancel. Nothing is written; the caller is told with 2.
if ARGV[8] == '1' and redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then
  if ARGV[9] ~= '' then
    -- The origin's word (a 429's pause, a congestion cut) holds for the
    -- aggregation whatever becomes of this job.
    shape(nkeys, cjson.decode(ARGV[9]))
  end
  return 2
end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then
  return 0
end
local score = tonumber(ARGV[3])
if ARGV[9] ~= '' then
  local signal = cjson.decode(ARGV[9])
  local paused_until = shape(nkeys, signal)
  nkeys = nkeys - 1
  if signal.hold then
    -- A throttled job waits for the pause's end, whoever set it.
    score = math.max(score, paused_until)
  end
end
redis.call('HDEL', KEYS[1], 'owner')
if #ARGV >= 10 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 10))
end
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[4])
end
local wake = ARGV[6] ~= ''
if nkeys >= 4 then
  if wake then
    local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    wake = not head[2] or tonumber(head[2]) > score
  end
  redis.call('ZADD', KEYS[4], score, ARGV[1])
end
if nkeys >= 5 then
  redis.call('ZADD', KEYS[5], 'LT', score, ARGV[5])
end
if wake then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return 1
