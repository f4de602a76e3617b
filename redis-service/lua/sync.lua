#!lua flags=allow-cross-slot-keys
-- Entries of a proxy's report (POST /v1/sync), several per call: for each, add what the
-- proxy admitted to the key's global sliding-window count, then allocate the proxy's
-- share of the limit. The share steps mirror src/shares.rs::allocate (the reference,
-- unit-tested there).
--
-- One call carries several entries (32: `SYNC_CHUNK` in src/store/redis/scripts.rs)
-- whose keys all live on the node it is sent to (`allow-cross-slot-keys`, Redis >= 7.0;
-- only the first key is declared, the others travel in ARGV): a report of 1000 entries
-- costs a few dozen script calls, in one pipeline per node, instead of 1000. Every key
-- is read before any is written, so a key that is not on this node (a slot just
-- migrated) fails the call before it changed anything.
--
-- Each key is one hash per (rule, key, window), read with one HGETALL and written with
-- one HSET:
--   i, c, p      window index, its count, the previous window's count (the same fields
--                sliding_window.lua uses, so reconciliation can add to it)
--   @<proxy id>  "demand grant updated_ms" of each proxy reporting the key
-- KEYS[1]  the first entry's key (declared for routing)
-- ARGV     proxy_id, ttl_ms, floor, max_peers, headroom, then per entry:
--          key, window_secs, max, admitted, rate (req/s)
-- Returns  per entry {used, remaining, reset_at (unix s: the count back to 0),
--          grant * 1e9 (floored)}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = math.floor(now * 1000)
local me = '@' .. ARGV[1]
local ttl = tonumber(ARGV[2])
local floor = tonumber(ARGV[3])
local max_peers = tonumber(ARGV[4])
local headroom = tonumber(ARGV[5]) or 0
local out = {}
local n_entries = (#ARGV - 5) / 5

local hashes = {}
local seen = {}
for e = 1, n_entries do
  hashes[e] = redis.call('HGETALL', ARGV[5 + (e - 1) * 5 + 1])
end

for e = 1, n_entries do
  local a = 5 + (e - 1) * 5
  local key = ARGV[a + 1]
  local w = tonumber(ARGV[a + 2])
  local max = tonumber(ARGV[a + 3])
  local admitted = tonumber(ARGV[a + 4])
  local rate = tonumber(ARGV[a + 5]) or 0
  if rate ~= rate or rate < 0 then rate = 0 end

  local h = hashes[e]
  -- The same key twice in one call: the second must see the first one's write.
  if seen[key] then h = redis.call('HGETALL', key) end
  seen[key] = true
  local si, c, p = nil, 0, 0
  local n, sum_d, others = 0, 0, 0
  local known, my_old = false, 0
  local dead = {}
  for k = 1, #h, 2 do
    local f = h[k]
    if f == 'i' then
      si = tonumber(h[k + 1])
    elseif f == 'c' then
      c = tonumber(h[k + 1]) or 0
    elseif f == 'p' then
      p = tonumber(h[k + 1]) or 0
    else
      local d, g, u = string.match(h[k + 1], '^(%S+) (%S+) (%S+)$')
      d = tonumber(d) or 0
      g = tonumber(g) or 0
      u = tonumber(u) or 0
      if u + ttl <= now_ms then
        dead[#dead + 1] = f
      else
        n = n + 1
        if f == me then
          known = true
          my_old = d
        else
          sum_d = sum_d + d
          others = others + g
        end
      end
    end
  end

  -- global count
  local idx = math.floor(now / w)
  if si == idx - 1 then
    p = c
    c = 0
  elseif si ~= idx then
    c = 0
    p = 0
  end
  c = c + admitted
  local frac = (now - idx * w) / w
  local used = math.floor(p * (1 - frac) + c + 1e-9)
  local remaining = math.max(0, max - used)

  -- share
  local grant = 0
  if #dead > 0 then
    redis.call('HDEL', key, unpack(dead))
  end
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
    target = target * (1 - headroom)
    grant = math.max(0, math.min(target, 1 - others, 1))
    redis.call('HSET', key, 'i', idx, 'c', c, 'p', p, me,
      string.format('%.17g %.17g %d', demand, grant, now_ms))
  else
    redis.call('HSET', key, 'i', idx, 'c', c, 'p', p)
  end
  redis.call('PEXPIRE', key, math.max(w * 2000, ttl * 2))
  -- reset_at: when the global estimate is back to 0 (see sliding_window.lua).
  local reset = math.ceil(now)
  if c > 0 then
    reset = (idx + 2) * w
  elseif p > 0 then
    reset = (idx + 1) * w
  end
  out[e] = {used, remaining, reset, math.floor(grant * 1000000000)}
end
return out
