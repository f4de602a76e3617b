#!lua flags=allow-cross-slot-keys
-- Records of a proxy's report (POST /v1/sync), several per call. A record is one
-- (rule, client key, limit): the global sliding-window count of the limit and, per proxy
-- that reported the key, its demand, grant and last report (meshlimit_core::shares).
-- For each record: add what the proxy admitted to the count, then allocate its share.
--
-- The allocation is a line-by-line port of `allocate_detailed` in core/src/shares.rs
-- (the reference; the parity test in tests/redis_single.rs runs both on the same
-- reports). Integer math throughout: shares and demands in parts per 10^9 of the limit,
-- times in Redis-clock milliseconds. Lua numbers are doubles, exact below 2^53; every
-- stored value stays below it. The products in `observed_demand`, `expected_hits` and
-- `headroom` are computed by long division in base 1000 (`mul_div`), exact while the
-- divisor is below 4.5e12 (max * span in ms, the window in ms, requests per interval);
-- beyond that, and for a headroom variance above 2^53, doubles may round by a part per
-- 10^9 of a share, or one hit of an expected count.
--
-- One call carries several records (32: `SYNC_CHUNK` in src/store/redis/scripts.rs)
-- whose keys all live on the node it is sent to (`allow-cross-slot-keys`, Redis >= 7.0;
-- only the first key is declared, the others travel in ARGV). Every key is read before
-- any is written, so a key that is not on this node (a slot just migrated) fails the
-- call before it changed anything.
--
-- Each record is one hash, read with one HGETALL:
--   i, c, p      window index, its count, the previous window's count
--   @<proxy id>  "demand grant updated_ms" of each proxy holding a share
-- KEYS[1]  the first record's key (declared for routing)
-- ARGV     proxy_id, interval_ms, margin_ppm, epsilon, lease_ms, max_peers, keep,
--          jump_sigmas, headroom_sigmas, n_dead, then n_dead dead proxy ids (their
--          peers are dropped), then per record:
--          key, window_secs, max, admitted, hits (admitted + rejected), first_span_ms,
--          mode (0 allocate, 1 release: drop this proxy's peer, 2 count only)
-- Returns  per record {grant, target, used}
local ONE = 1000000000
local DEMAND_CAP = 4 * ONE

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local me = ARGV[1]
local interval_ms = tonumber(ARGV[2])
local margin_ppm = tonumber(ARGV[3])
local epsilon = tonumber(ARGV[4])
local lease_ms = tonumber(ARGV[5])
local max_peers = tonumber(ARGV[6])
local keep = tonumber(ARGV[7])
local jump_sigmas = tonumber(ARGV[8])
local headroom_sigmas = tonumber(ARGV[9])
local n_dead = tonumber(ARGV[10])
local dead = {}
for i = 1, n_dead do
  dead[ARGV[10 + i]] = true
end
local first = 10 + n_dead
local n_records = (#ARGV - first) / 7

-- floor(a / b) for integers a >= 0, b > 0, corrected for the rounding of the division.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- floor(a * b / c) for integers a, b >= 0, c > 0: Horner over b's digits in base 1000
-- (most significant first), so no intermediate exceeds 2000 * c + a * 999. No table:
-- this runs several times per record.
local function mul_div(a, b, c)
  local x = a * b
  if x < 9007199254740992 then
    -- Below 2^53 the product is exact (a product at or above it never rounds below).
    return idiv(x, c)
  end
  local p = 1
  while p * 1000 <= b do
    p = p * 1000
  end
  local q, r = 0, 0
  while p >= 1 do
    local d = idiv(b, p)
    b = b - d * p
    local x = r * 1000 + a * d
    local qi = idiv(x, c)
    q = q * 1000 + qi
    r = x - qi * c
    p = p / 1000
  end
  return q
end

-- shares::observed_demand
local function observed_demand(hits, max, window_ms, span_ms)
  local den = math.max(max, 1) * math.max(span_ms, 1)
  return math.min(mul_div(hits * window_ms, ONE, den), DEMAND_CAP)
end

-- shares::expected_hits: d * max * span / (ONE * window), as floor(floor(d*max*span/window)/ONE)
local function expected_hits(d, max, window_ms, span_ms)
  return idiv(mul_div(d, max * span_ms, math.max(window_ms, 1)), ONE)
end

-- shares::Smoothing::next
local function smooth(d, x, hits, e)
  local dev = math.abs(hits - e)
  if dev * dev > jump_sigmas * jump_sigmas * math.max(e, 1) then
    return x
  end
  return idiv(keep * d + x, keep + 1)
end

-- shares::want
local function want(demand)
  local grown = idiv(math.min(demand, DEMAND_CAP) * (1000000 + margin_ppm), 1000000)
  return math.min(grown + epsilon, ONE)
end

-- shares::headroom
local function isqrt(v)
  local r = math.floor(math.sqrt(v))
  while r * r > v do
    r = r - 1
  end
  while (r + 1) * (r + 1) <= v do
    r = r + 1
  end
  return r
end

local function headroom(d, per_interval)
  local var = mul_div(math.min(d, DEMAND_CAP), ONE, math.max(per_interval, 1))
  return headroom_sigmas * isqrt(var)
end

-- shares::water_level_of over the values of `xs`
local function water_level_of(total, xs)
  local sum = 0
  for _, w in ipairs(xs) do
    sum = sum + w
  end
  if sum <= total then
    return total
  end
  local level = 0
  while true do
    local satisfied, above = 0, 0
    for _, w in ipairs(xs) do
      if w <= level then
        satisfied = satisfied + w
      else
        above = above + 1
      end
    end
    local nxt = idiv(total - math.min(satisfied, total), math.max(above, 1))
    if above == 0 or nxt == level then
      return math.max(level, nxt)
    end
    level = nxt
  end
end

-- shares::allocate_detailed on `peers` (a list of {id, demand, grant, updated}); returns
-- grant, target, this proxy's peer (nil: not stored, there are max_peers others) and
-- the fields of the peers dropped (nil when none). Only this proxy's peer changes.
local function allocate(peers, hits, max, window_ms, first_span_ms)
  local live = {}
  local gone = nil
  for _, q in ipairs(peers) do
    if not dead[q.id] and q.updated + lease_ms > now_ms then
      live[#live + 1] = q
    else
      gone = gone or {}
      gone[#gone + 1] = q.field
    end
  end
  local mine = nil
  for i, q in ipairs(live) do
    if q.id == me then
      mine = i
    end
  end
  if mine == nil and #live >= max_peers then
    return 0, 0, nil, gone
  end
  local span
  if mine ~= nil then
    span = math.max(0, now_ms - live[mine].updated)
  else
    span = first_span_ms
  end
  local x = observed_demand(hits, max, window_ms, span)
  local demand = x
  if mine ~= nil then
    local d = live[mine].demand
    local e = expected_hits(d, max, window_ms, span)
    demand = smooth(d, x, hits, e)
  else
    live[#live + 1] = {id = me, demand = demand, grant = 0, updated = now_ms}
    mine = #live
  end
  live[mine].demand = demand
  live[mine].updated = now_ms

  local wants = {}
  local sum = 0
  for i, q in ipairs(live) do
    wants[i] = want(q.demand)
    sum = sum + wants[i]
  end
  local target
  if sum > ONE then
    -- Contended: max-min fair shares of the whole.
    target = math.min(want(demand), water_level_of(ONE, wants))
  else
    -- Room to spare: everyone gets its want, plus noise headroom out of the rest.
    local per_interval = idiv(max * interval_ms, math.max(window_ms, 1))
    local extras = {}
    for i, q in ipairs(live) do
      extras[i] = headroom(q.demand, per_interval)
    end
    local level = water_level_of(ONE - sum, extras)
    target = want(demand) + math.min(extras[mine], level)
  end
  local others = 0
  for i, q in ipairs(live) do
    if i ~= mine then
      others = others + q.grant
    end
  end
  local grant = math.min(target, math.max(0, ONE - others))
  live[mine].grant = grant
  return grant, target, live[mine], gone
end

local hashes = {}
for r = 1, n_records do
  hashes[r] = redis.call('HGETALL', ARGV[first + (r - 1) * 7 + 1])
end

local out = {}
local seen = {}
for r = 1, n_records do
  local a = first + (r - 1) * 7
  local key = ARGV[a + 1]
  local w = tonumber(ARGV[a + 2])
  local max = tonumber(ARGV[a + 3])
  local admitted = tonumber(ARGV[a + 4])
  local hits = tonumber(ARGV[a + 5])
  local first_span_ms = tonumber(ARGV[a + 6])
  local mode = tonumber(ARGV[a + 7])

  local h = hashes[r]
  -- The same key twice in one call: the second must see the first one's write.
  if seen[key] then
    h = redis.call('HGETALL', key)
  end
  seen[key] = true
  local si, c, p = nil, 0, 0
  local peers = {}
  for k = 1, #h, 2 do
    local f = h[k]
    if f == 'i' then
      si = tonumber(h[k + 1])
    elseif f == 'c' then
      c = tonumber(h[k + 1]) or 0
    elseif f == 'p' then
      p = tonumber(h[k + 1]) or 0
    elseif string.sub(f, 1, 1) == '@' then
      local d, g, u = string.match(h[k + 1], '^(%d+) (%d+) (%d+)$')
      peers[#peers + 1] = {
        id = string.sub(f, 2), demand = tonumber(d) or 0, grant = tonumber(g) or 0,
        updated = tonumber(u) or 0, field = f,
      }
    end
  end

  -- The global count (the same arithmetic as sliding_window.lua).
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

  local grant, target = 0, 0
  local mine = nil
  if mode == 0 then
    local gone
    grant, target, mine, gone = allocate(peers, hits, max, w * 1000, first_span_ms)
    -- Peers dropped (dead, or past the lease) go in one HDEL.
    if gone ~= nil then
      redis.call('HDEL', key, unpack(gone))
    end
  elseif mode == 1 then
    redis.call('HDEL', key, '@' .. me)
  end
  -- The count and this proxy's peer in one write.
  if mine ~= nil then
    redis.call('HSET', key, 'i', idx, 'c', c, 'p', p, '@' .. me,
      string.format('%.0f %.0f %.0f', mine.demand, mine.grant, mine.updated))
  else
    redis.call('HSET', key, 'i', idx, 'c', c, 'p', p)
  end
  redis.call('PEXPIRE', key, math.max(w * 2000, lease_ms))
  out[r] = {grant, target, used}
end
return out
