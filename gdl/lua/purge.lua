-- Start the purge of an aggregation (DELETE /aggregations/<id>), in one O(1)
-- step whatever its queue holds: the queue is renamed to a purge set, whose
-- jobs a purger then cancels in chunks (cancel.lua), so that every job queued
-- before this step is in the set and every job enqueued after it is in a new
-- queue (kept). The purge is recorded in the purges hash until its set is
-- empty, so that a purge half done when a process dies is finished by another.
-- Jobs of the aggregation in flight now were accepted before this step too:
-- the caller names those it saw in flight, and the queue's head as it saw it
-- (a job taken between that look and this step is in flight now); each found
-- in flight here is marked for cancelling and its holder told, as cancel.lua does.
-- KEYS[1] the aggregation's queue   KEYS[2] the purge set (a new key)
-- KEYS[3] the due index   KEYS[4] the purges hash   KEYS[5] the aggregation hash
-- KEYS[6] the count of marks made (raised per new mark, as by cancel.lua)
-- KEYS[7..] the hashes of the candidate jobs, in the order of ARGV[8..]
-- ARGV[1] aggregation id   ARGV[2] purge token (field of KEYS[4])
-- ARGV[3] the purge's record (JSON, value in KEYS[4])
-- ARGV[4] '1': a callback for each cancelled job, '0': none
-- ARGV[5] the error the cancelled jobs report   ARGV[6] the cancel channel
-- ARGV[7] the purge channel (told the token: a purger starts at once)
-- ARGV[8..] candidate job ids
-- Returns {jobs moved to the purge set, jobs in flight marked}, or -1 when the
-- aggregation is unknown (no record, no queue, nothing of it in flight).
local queued = redis.call('ZCARD', KEYS[1])
local marked = 0
for i = 8, #ARGV do
  local job = KEYS[i - 1]
  local found = redis.call('HMGET', job, 'state', 'aggr_id')
  if found[1] == 'in_flight' and found[2] == ARGV[1] then
    if redis.call('HSETNX', job, 'cancel', ARGV[4]) == 1 then
      redis.call('HSET', job, 'cancel_reason', ARGV[5])
      redis.call('INCR', KEYS[6])
    end
    redis.call('PUBLISH', ARGV[6], ARGV[i])
    marked = marked + 1
  end
end
if queued == 0 and marked == 0 and redis.call('EXISTS', KEYS[5]) == 0 then
  return -1
end
if queued > 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
  redis.call('PUBLISH', ARGV[7], ARGV[2])
end
redis.call('ZREM', KEYS[3], ARGV[1])
return {queued, marked}
