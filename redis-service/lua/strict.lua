-- A strict check (POST /v1/strict): `hits` against every limit of one (rule, client),
-- all-or-nothing, as GCRA on the Redis clock. A port of meshlimit_core::gcra::check in
-- integer microseconds (the core works in nanoseconds, which exceed 2^53 as Unix times;
-- a limit's interval is rounded down to a whole microsecond, at least 1).
--
-- KEYS[k]  one string per limit: its theoretical arrival time (unix microseconds), with
--          a TTL until the bucket is full again (a full bucket is no key).
-- ARGV[1]  hits; then window_secs, max, burst for each key.
-- Returns  {allowed, tightest (0-based), remaining, reset_ms, retry_after_ms}: allowed,
--          the limit closest to running out (ties: the one that takes longer to refill);
--          refused, the refusing limit that takes longest to give a token back.
--          reset_ms: until that limit is full again; retry_after_ms: until every limit
--          has the tokens asked for (0 when allowed). Both rounded up.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local hits = tonumber(ARGV[1])
local n = #KEYS
local allowed = true
local retry = 0
local clamped = false
local tightest, best_rem, best_reset = 0, nil, nil
local refusing = nil
local tats, nexts, depths = {}, {}, {}
for k = 1, n do
  local w = tonumber(ARGV[3 * k - 1])
  local max = tonumber(ARGV[3 * k])
  local burst = tonumber(ARGV[3 * k + 1])
  local interval = math.max(1, math.floor(w * 1000000 / max))
  local depth = interval * burst
  depths[k] = depth
  local horizon = now + depth
  local tat = tonumber(redis.call('GET', KEYS[k])) or 0
  -- A timestamp beyond one bucket depth (the clock stepped back after a failover) is
  -- clamped, and the clamp kept.
  if tat > horizon then
    clamped = true
    tat = horizon
  end
  tats[k] = tat
  local start = math.max(tat, now)
  local cost = interval * hits
  local new = start + cost
  local remaining, after
  if cost <= depth and new <= horizon then
    remaining = math.floor((horizon - new) / interval)
    after = new
  else
    local wait = new - horizon
    if wait > retry then retry = wait end
    allowed = false
    remaining = math.floor((horizon - start) / interval)
    if refusing == nil or wait > refusing[1] then
      refusing = {wait, k - 1, remaining, start - now}
    end
    after = start
  end
  nexts[k] = after
  local reset = after - now
  if best_rem == nil or remaining < best_rem or (remaining == best_rem and reset > best_reset) then
    tightest, best_rem, best_reset = k - 1, remaining, reset
  end
end
local function store(k, tat)
  local ttl = math.ceil((tat - now) / 1000)
  if ttl > 0 then
    redis.call('SET', KEYS[k], string.format('%.0f', tat), 'PX', ttl)
  end
end
if allowed then
  for k = 1, n do store(k, nexts[k]) end
  retry = 0
elseif clamped then
  for k = 1, n do store(k, tats[k]) end
end
if refusing ~= nil then
  tightest, best_rem, best_reset = refusing[2], refusing[3], refusing[4]
end
local ok = 0
if allowed then ok = 1 end
return {ok, tightest, best_rem, math.ceil(best_reset / 1000), math.ceil(retry / 1000)}
