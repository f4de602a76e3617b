-- wrk script for scripts/bench-filter.sh, case `companion`: the strict check the filter
-- sends for strict-1 (same rule id, limits and body shape as core/src/strict.rs builds
-- it, one client), straight to the companion's POST /v1/strict, without Envoy. What the
-- companion and Redis alone add to a strict request.
--   BENCH_TOKEN  the companion's bearer token (from the environment, not the command line)
-- done() prints the same RESULT line as wrk-keys.lua.

wrk.method = "POST"
wrk.body = '{"rule":"bench","key":"00000000000000aa","limits":'
  .. '[{"window_secs":1,"max":1000000000,"burst":1000000000}],"hits":1}'
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
