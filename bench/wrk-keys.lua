-- wrk script for scripts/bench-filter.sh.
-- Every case runs through this same script so the load generator does the same work
-- each time; only the number of distinct clients changes:
--   BENCH_KEYS=N  rotate x-api-key over N values (client-1 .. client-N), default 1.
-- done() prints one machine-readable RESULT line (latencies in microseconds).

local n = tonumber(os.getenv("BENCH_KEYS") or "1")
local path = os.getenv("BENCH_PATH") or "/api/bench"
local reqs = {}
local i = 0

function init(args)
  -- Built once per thread: request() then only picks a ready string.
  for k = 1, n do
    reqs[k] = wrk.format("GET", path, { ["x-api-key"] = "client-" .. k })
  end
  -- Start each thread at a different key.
  i = math.random(n) - 1
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
