-- tea_dist resource limits, one script per operation (see limits_redis.py).
--
-- This file is a prelude shared by every script, followed by sections that start with a
-- line "--@ name". The rules mirror tea_dist/policies/limits.py (on_acquire, on_renew,
-- on_release, on_wait); the shared contract tests run both stores.
--
-- KEYS, for every script (Keys.limit_keys, all with the hash tag {name}, one Cluster slot):
--   1 holders  zset holder -> lease expiry (epoch seconds); a lease is live while expiry > now
--   2 starts   zset seq -> start time: the rate window's log
--   3 waiting  zset holder -> waiting until
--   4 info     hash max_concurrent, rate, period (as last given), seq, start:<holder> -> seq
-- ARGV "now" is epoch seconds, or "" for the Redis server's clock, so that machines with
-- skewed clocks agree. After every write each key expires once nothing in it matters any more.

local SLACK = 1.0

local function fmt(x)
  return string.format('%.17g', x)
end

local function newest(i)
  local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
  if last[2] then return tonumber(last[2]) end
  return nil
end

-- Every key expires when its last lease, start (+ one period) and waiter is over, plus SLACK.
local function touch(now)
  local keep = 0
  local lease, start, waiter = newest(1), newest(2), newest(3)
  local period = tonumber(redis.call('HGET', KEYS[4], 'period'))
  if lease then keep = math.max(keep, lease - now) end
  if start and period then keep = math.max(keep, start + period - now) end
  if waiter then keep = math.max(keep, waiter - now) end
  local ms = math.ceil((keep + SLACK) * 1000)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ms) end
end

-- Drop expired leases (and the start each noted), starts older than one period, past waiters.
local function purge(now, period)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
  for _, holder in ipairs(gone) do redis.call('HDEL', KEYS[4], 'start:' .. holder) end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now)) end
  if period then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now - period)) end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now))
end

--@ acquire
-- ARGV: holder, max_concurrent|'', rate count|'', period|'', lease_seconds, now, poll, rate|''.
-- Returns '' when granted, else the seconds to wait before asking again (as text).
local holder = ARGV[1]
local max_c, count, period = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, poll = tonumber(ARGV[5]), tonumber(ARGV[7])
local now = now_from(ARGV[6])
purge(now, period)
redis.call('HSET', KEYS[4], 'max_concurrent', ARGV[2], 'rate', ARGV[8], 'period', ARGV[4])
if redis.call('ZSCORE', KEYS[1], holder) then
  redis.call('ZADD', KEYS[1], fmt(now + lease), holder)
  redis.call('ZREM', KEYS[3], holder)
  touch(now)
  return ''
end
local wait = nil
if max_c and redis.call('ZCARD', KEYS[1]) >= max_c then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  wait = math.min(poll, tonumber(first[2]) - now)
end
if count then
  local n = redis.call('ZCARD', KEYS[2])
  if n >= count then
    local oldest = redis.call('ZRANGE', KEYS[2], n - count, n - count, 'WITHSCORES')
    local w = tonumber(oldest[2]) + period - now
    if wait == nil or w > wait then wait = w end
  end
end
if wait ~= nil then
  touch(now)
  return fmt(wait)
end
redis.call('ZADD', KEYS[1], fmt(now + lease), holder)
if count then
  local seq = tostring(redis.call('HINCRBY', KEYS[4], 'seq', 1))
  redis.call('ZADD', KEYS[2], fmt(now), seq)
  redis.call('HSET', KEYS[4], 'start:' .. holder, seq)
end
redis.call('ZREM', KEYS[3], holder)
touch(now)
return ''

--@ renew
-- ARGV: holder, lease_seconds, now. Returns 1 when renewed, 0 when the holder holds no lease.
local now = now_from(ARGV[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', fmt(now + tonumber(ARGV[2])), ARGV[1])
touch(now)
return 1

--@ release
-- ARGV: holder, started 1|0, now. With started 0 the holder's start leaves the rate window.
local now = now_from(ARGV[3])
local field = 'start:' .. ARGV[1]
local seq = redis.call('HGET', KEYS[4], field)
if seq and ARGV[2] == '0' then redis.call('ZREM', KEYS[2], seq) end
redis.call('HDEL', KEYS[4], field)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
touch(now)
return 1

--@ waiting
-- ARGV: holder, until, now, max_concurrent|'', rate|'', period|''.
local now = now_from(ARGV[3])
local untl = tonumber(ARGV[2])
if untl <= now then return 0 end
redis.call('ZADD', KEYS[3], fmt(untl), ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[4], 'max_concurrent', ARGV[4], 'rate', ARGV[5], 'period', ARGV[6])
end
touch(now)
return 1

--@ state
-- ARGV: now. Read only. Returns {known 0|1, held, waiting, started, max_concurrent, rate}.
local now = now_from(ARGV[1])
local info = redis.call('HMGET', KEYS[4], 'max_concurrent', 'rate', 'period')
local known = redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local after = '(' .. fmt(now)
local held = redis.call('ZCOUNT', KEYS[1], after, '+inf')
local waiting = redis.call('ZCOUNT', KEYS[3], after, '+inf')
local started = 0
local period = tonumber(info[3])
if period then started = redis.call('ZCOUNT', KEYS[2], '(' .. fmt(now - period), '+inf') end
return {math.min(known, 1), held, waiting, started, info[1] or '', info[2] or ''}

--@ reset
-- Drops the limit. Returns the number of its keys that existed.
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
