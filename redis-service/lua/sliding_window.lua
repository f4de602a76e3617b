-- Sliding window counter, several windows of one (rule, client), all-or-nothing.
-- Mirrors the sliding window of src/store/memory.rs (`WindowAt`) exactly; timed by the
-- Redis server clock (TIME) so that proxies and service instances whose clocks disagree
-- still share one window.
--
-- KEYS[i]  one hash per window: i = window index, c = its count, p = the previous
--          window's count. TTL two windows: idle clients cost nothing afterwards.
-- ARGV[1]  hits; ARGV[2] force ("1": count even when over, used to reconcile counts a
--          fallback already admitted); then window_secs, max for each key.
-- Returns  {allowed, tightest (0-based), remaining, reset_at (unix s), retry_after_ms}
--          tightest: admitted, the limit with the fewest left; refused, the limit that
--          takes longest to let this request through (ties: the longer window).
--          reset_at: when the tightest limit is full again (its estimate back to 0):
--          two window boundaries ahead while the current window holds a count, one
--          when only the previous one does.
--          retry_after_ms (refused): when this same request fits, if nothing else is
--          counted meanwhile; rounded up, so a retry at that time is admitted.
-- The service refuses a request for more hits than a limit's max before it gets here
-- (it could never fit).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local hits = tonumber(ARGV[1])
local force = ARGV[2] == '1'
local n = #KEYS
local allowed = true
local retry = 0
local st = {}
-- Float slack on "fits": at the exact time a retry is told to come back, the estimate
-- is exactly max - hits, which rounding could otherwise put a hair above.
local eps = 1e-9
for k = 1, n do
  local w = tonumber(ARGV[1 + 2 * k])
  local max = tonumber(ARGV[2 + 2 * k])
  local idx = math.floor(now / w)
  local v = redis.call('HMGET', KEYS[k], 'i', 'c', 'p')
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
  local frac = (now - idx * w) / w
  local est = p * (1 - frac) + c
  local wait = 0
  if est + hits > max + eps then
    allowed = false
    if hits > max then
      wait = 2 * w
    elseif c + hits <= max then
      -- the previous window's weight falls linearly until it fits
      wait = ((1 - (max - c - hits) / p) - frac) * w
    else
      -- only in the next window, where this window's count becomes the decaying one
      wait = (1 - frac) * w + math.max(0, 1 - (max - hits) / c) * w
    end
    if wait > retry then retry = wait end
  end
  st[k] = {w, max, idx, c, p, est, wait}
end
local best, best_w, best_k, best_rem, best_reset = nil, 0, 0, 0, 0
for k = 1, n do
  local s = st[k]
  local w, max, idx, c, p, est, wait = s[1], s[2], s[3], s[4], s[5], s[6], s[7]
  if allowed or force then
    c = c + hits
    est = est + hits
    redis.call('HSET', KEYS[k], 'i', idx, 'c', c, 'p', p)
    redis.call('PEXPIRE', KEYS[k], w * 2000)
  end
  local rem = math.max(0, math.floor(max - est + 1e-9))
  local reset
  if c > 0 then
    reset = (idx + 2) * w
  elseif p > 0 then
    reset = (idx + 1) * w
  else
    reset = math.ceil(now)
  end
  -- Admitted: fewest left first; refused: longest wait first. Ties: longer window.
  local key = rem
  if not allowed then key = -wait end
  if best == nil or key < best or (key == best and w > best_w) then
    best, best_w, best_k, best_rem, best_reset = key, w, k - 1, rem, reset
  end
end
local ok = 0
if allowed then ok = 1 retry = 0 end
return {ok, best_k, best_rem, best_reset, math.ceil(retry * 1000)}
