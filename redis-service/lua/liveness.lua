-- The liveness registry (src/liveness.rs): one sorted set, proxy id -> the Redis-clock
-- millisecond it stops being live. A report of `proxy` (an empty one is a heartbeat)
-- marks it live for three of its intervals; ids dead for longer than the lease are
-- forgotten (by then the lease has dropped their peers from every record).
--
-- KEYS[1]  the registry
-- ARGV     proxy_id, interval_ms, lease_ms, max_dead, max_proxies
-- Returns  {live count, the ids that died within the lease, most recent first (at most
--          max_dead)}, or {-1} when the registry already holds max_proxies others.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local proxy = ARGV[1]
local interval_ms = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local max_dead = tonumber(ARGV[4])
local max_proxies = tonumber(ARGV[5])

redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms - lease_ms)
if not redis.call('ZSCORE', key, proxy) and redis.call('ZCARD', key) >= max_proxies then
  return {-1}
end
redis.call('ZADD', key, now_ms + 3 * interval_ms, proxy)
-- Nobody reporting for a lease and three intervals: the registry goes too.
redis.call('PEXPIRE', key, lease_ms + 3 * interval_ms)
local out = {redis.call('ZCOUNT', key, '(' .. now_ms, '+inf')}
local dead = redis.call('ZREVRANGEBYSCORE', key, now_ms, '-inf', 'LIMIT', 0, max_dead)
for i = 1, #dead do
  out[i + 1] = dead[i]
end
return out
