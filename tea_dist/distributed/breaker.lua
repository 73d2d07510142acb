-- tea_dist circuit breaker transitions, one script per operation (see breaker_redis.py).
--
-- This file is a prelude shared by every script, followed by sections that start with a
-- line "--@ name". The rules mirror tea_dist/breaker.py (on_acquire, on_record); the shared
-- contract tests run both. A circuit is one hash: state, failures, opened_at, probes.
-- now_from(ARGV) comes from clock.lua: injected epoch seconds, or the Redis server's clock.

local function load(key)
  local v = redis.call('HMGET', key, 'state', 'failures', 'opened_at', 'probes')
  local c = {
    state = v[1] or 'closed',
    failures = tonumber(v[2]) or 0,
    opened_at = tonumber(v[3]),
    probes = tonumber(v[4]) or 0,
  }
  return c, v[1] ~= false
end

local function save(key, index, name, c)
  local opened = ''
  if c.opened_at ~= nil then opened = string.format('%.17g', c.opened_at) end
  redis.call('HSET', key, 'state', c.state, 'failures', tostring(c.failures),
    'opened_at', opened, 'probes', tostring(c.probes))
  redis.call('SADD', index, name)
end

local function closed()
  return {state = 'closed', failures = 0, opened_at = nil, probes = 0}
end

local function timed_out(c, reset_timeout, now)
  return c.opened_at == nil or now - c.opened_at >= reset_timeout
end

local function probe_period(now)
  return {state = 'half_open', failures = 0, opened_at = now, probes = 1}
end

-- Close a known circuit; returns its previous state, or nil when it does not exist.
local function reset(key, index, name)
  local c, exists = load(key)
  if not exists then return nil end
  save(key, index, name, closed())
  return c.state
end

--@ acquire
-- KEYS: circuit hash, circuits index. ARGV: name, reset_timeout, half_open_max_calls, now.
-- Returns {allowed 0/1, probe 0/1, state after, previous state if it changed else ''}.
local c, exists = load(KEYS[1])
local reset_timeout, max_calls = tonumber(ARGV[2]), tonumber(ARGV[3])
if c.state == 'closed' then
  if not exists then save(KEYS[1], KEYS[2], ARGV[1], c) end
  return {1, 0, 'closed', ''}
end
local now = now_from(ARGV[4])
if c.state == 'open' then
  if not timed_out(c, reset_timeout, now) then return {0, 0, 'open', ''} end
  save(KEYS[1], KEYS[2], ARGV[1], probe_period(now))
  return {1, 1, 'half_open', 'open'}
end
if c.probes < max_calls then
  c.probes = c.probes + 1
  save(KEYS[1], KEYS[2], ARGV[1], c)
  return {1, 1, 'half_open', ''}
end
if timed_out(c, reset_timeout, now) then
  save(KEYS[1], KEYS[2], ARGV[1], probe_period(now))
  return {1, 1, 'half_open', ''}
end
return {0, 0, 'half_open', ''}

--@ record
-- KEYS: circuit hash, circuits index. ARGV: name, failure_threshold, success 0/1, probe 0/1, now.
-- Returns {state before, state after}.
local c = load(KEYS[1])
local before = c.state
local success, probe = ARGV[3] == '1', ARGV[4] == '1'
local after = nil
if before == 'closed' then
  if success then
    after = closed()
  else
    c.failures = c.failures + 1
    if c.failures >= tonumber(ARGV[2]) then
      after = {state = 'open', failures = c.failures, opened_at = now_from(ARGV[5]), probes = 0}
    else
      after = c
    end
  end
elseif before == 'half_open' and probe then
  if success then
    after = closed()
  else
    after = {state = 'open', failures = c.failures + 1, opened_at = now_from(ARGV[5]), probes = 0}
  end
end
if after ~= nil then save(KEYS[1], KEYS[2], ARGV[1], after) end
local state = before
if after ~= nil then state = after.state end
return {before, state}

--@ release
-- KEYS: circuit hash, circuits index. A half-open probe that ended with no outcome (cancelled)
-- gives its slot back; nothing is counted. Returns the state.
local c, known = load(KEYS[1])
if known and c.state == 'half_open' and c.probes > 0 then
  redis.call('HSET', KEYS[1], 'probes', tostring(c.probes - 1))
end
return c.state

--@ reset_one
-- KEYS: circuit hash, circuits index. ARGV: name. Returns {name, old state} or {}.
local old = reset(KEYS[1], KEYS[2], ARGV[1])
if old == nil or old == 'closed' then return {} end
return {ARGV[1], old}

--@ reset_all
-- KEYS: circuits index. ARGV: circuit key prefix (Keys.circuit_prefix()).
-- Returns {name, old state, name, old state, ...} for the circuits that were not closed.
local changed = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local old = reset(ARGV[1] .. name, KEYS[1], name)
  if old ~= nil and old ~= 'closed' then
    table.insert(changed, name)
    table.insert(changed, old)
  end
end
return changed

--@ states
-- KEYS: circuits index. ARGV: circuit key prefix. Returns {name, state, ...}.
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local state = redis.call('HGET', ARGV[1] .. name, 'state')
  if state then
    table.insert(out, name)
    table.insert(out, state)
  end
end
return out
