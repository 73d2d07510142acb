-- Shared by every tea_dist script (see scripted.py): the time a script works with.
-- ARGV "now" is epoch seconds, or "" to use the Redis server's clock, so that machines with
-- skewed clocks agree.

local function now_from(arg)
  if arg == nil or arg == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return tonumber(arg)
end
