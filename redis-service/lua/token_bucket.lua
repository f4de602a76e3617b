-- Token bucket as GCRA, several limits of one (rule, client), all-or-nothing.
-- Mirrors meshlimit_core::gcra::check (in microseconds, on the Redis server clock).
--
-- KEYS[i]  one string per limit: the theoretical arrival time (unix microseconds).
--          Its TTL is the time until the bucket is full again: a full bucket is no key.
-- ARGV[1]  hits; ARGV[2] force ("1": take the tokens even when short, reconciling);
--          then window_secs, max, burst for each key.
-- Returns  {allowed, tightest (0-based), remaining, reset_at (unix s), retry_after_ms}
--          tightest: admitted, the limit with the fewest left; refused, the limit that
--          takes longest to let this request through (ties: the longer window).
--          reset_at: when the tightest bucket is full again (its timestamp, rounded up).
--          retry_after_ms (refused): when this same request fits; rounded up.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local hits = tonumber(ARGV[1])
local force = ARGV[2] == '1'
local n = #KEYS
local allowed = true
local retry = 0
local st = {}
for k = 1, n do
  local w = tonumber(ARGV[3 * k])
  local max = tonumber(ARGV[3 * k + 1])
  local burst = tonumber(ARGV[3 * k + 2])
  local interval = w * 1000000 / max
  local depth = interval * burst
  local horizon = now + depth
  local tat = tonumber(redis.call('GET', KEYS[k])) or now
  -- A timestamp beyond one bucket depth (clock stepped back after a failover) is clamped.
  if tat > horizon then tat = horizon end
  local start = math.max(tat, now)
  local new = start + hits * interval
  -- 1 us of slack absorbs float rounding of fractional intervals.
  local fits = new <= horizon + 1
  local wait = 0
  if not fits then
    allowed = false
    wait = new - horizon
    if wait > retry then retry = wait end
  end
  st[k] = {w, interval, horizon, start, new, wait}
end
local best, best_w, best_k, best_rem, best_reset = nil, 0, 0, 0, 0
for k = 1, n do
  local s = st[k]
  local w, interval, horizon, start, new, wait = s[1], s[2], s[3], s[4], s[5], s[6]
  local after = start
  if allowed or force then
    after = math.min(new, horizon)
    local ttl = math.ceil((after - now) / 1000)
    if ttl > 0 then
      redis.call('SET', KEYS[k], string.format('%.0f', after), 'PX', ttl)
    end
  end
  local rem = math.max(0, math.floor((horizon - after) / interval + 1e-9))
  local reset = math.ceil(math.max(after, now) / 1000000)
  local key = rem
  if not allowed then key = -wait end
  if best == nil or key < best or (key == best and w > best_w) then
    best, best_w, best_k, best_rem, best_reset = key, w, k - 1, rem, reset
  end
end
local ok = 0
if allowed then ok = 1 retry = 0 end
return {ok, best_k, best_rem, best_reset, math.ceil(retry / 1000)}
