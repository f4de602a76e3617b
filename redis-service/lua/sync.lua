-- One entry of a proxy's report (POST /v1/sync): add what the proxy admitted to the
-- key's global sliding-window count, then allocate the proxy's share of the limit.
-- The share steps mirror src/shares.rs::allocate (the reference, unit-tested there).
--
-- KEYS[1]  sliding-window hash {i, c, p} of (rule, key, window)
-- KEYS[2]  shares hash: proxy id -> "demand grant updated_ms"
-- ARGV     window_secs, max, admitted, proxy_id, rate (req/s), ttl_ms, floor, max_peers
-- Returns  {used, remaining, reset_at (unix s), grant * 1e9 (floored)}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = math.floor(now * 1000)
local w = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local admitted = tonumber(ARGV[3])
local me = ARGV[4]
local rate = tonumber(ARGV[5]) or 0
if rate ~= rate or rate < 0 then rate = 0 end
local ttl = tonumber(ARGV[6])
local floor = tonumber(ARGV[7])
local max_peers = tonumber(ARGV[8])

-- global count
local idx = math.floor(now / w)
local v = redis.call('HMGET', KEYS[1], 'i', 'c', 'p')
local si = tonumber(v[1])
local c = tonumber(v[2]) or 0
local p = tonumber(v[3]) or 0
if si == idx - 1 then
  p = c
  c = 0
elseif si ~= idx then
  c = 0
  p = 0
end
if admitted > 0 or si ~= idx then
  c = c + admitted
  redis.call('HSET', KEYS[1], 'i', idx, 'c', c, 'p', p)
  redis.call('PEXPIRE', KEYS[1], w * 2000)
end
local frac = (now - idx * w) / w
local used = math.floor(p * (1 - frac) + c + 1e-9)
local remaining = math.max(0, max - used)

-- shares
local all = redis.call('HGETALL', KEYS[2])
local n = 0
local known = false
local my_old = nil
local sum_d = 0
local others = 0
for k = 1, #all, 2 do
  local id = all[k]
  local d, g, u = string.match(all[k + 1], '^(%S+) (%S+) (%S+)$')
  d = tonumber(d) or 0
  g = tonumber(g) or 0
  u = tonumber(u) or 0
  if u + ttl <= now_ms then
    redis.call('HDEL', KEYS[2], id)
  else
    n = n + 1
    if id == me then
      known = true
      my_old = d
    else
      sum_d = sum_d + d
      others = others + g
    end
  end
end
local grant = 0
if known or n < max_peers then
  local demand = rate
  if known then demand = (my_old + rate) / 2 end
  if not known then n = n + 1 end
  sum_d = sum_d + demand
  local target
  if sum_d > 0 then
    target = (1 - floor) * demand / sum_d + floor / n
  else
    target = 1 / n
  end
  grant = math.max(0, math.min(target, 1 - others, 1))
  redis.call('HSET', KEYS[2], me, string.format('%.17g %.17g %d', demand, grant, now_ms))
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end
return {used, remaining, (idx + 1) * w, math.floor(grant * 1000000000)}
