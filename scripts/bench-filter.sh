#!/usr/bin/env bash
# Throughput and latency cost of the meshlimit filter inside Envoy, measured with wrk.
#
#   scripts/bench-filter.sh            5 rounds x 5 cases x 5 s (about 3 minutes)
#   ROUNDS=3 DURATION=3 scripts/bench-filter.sh
#   BODY_BYTES=262144 scripts/bench-filter.sh      responses of 256 KB instead of 2 bytes
#   WASM=target/wasm32-wasip1/wasm/meshlimit_filter.wasm scripts/bench-filter.sh
#                                                  the module before wasm-trim
#   BASELINE=/tmp/old/meshlimit.wasm scripts/bench-filter.sh
#                                                  adds base-1 and base-10k: wasm-1 and
#                                                  wasm-10k on another build of the
#                                                  module, in the same interleaved rounds
#
# Cases (all the same Envoy, same route, same wrk script):
#   none    Envoy without any rate-limit filter
#   native  Envoy's C++ envoy.filters.http.local_ratelimit, one token bucket so large it
#           never rejects (1e9 per second), enabled and enforced for 100% of requests
#   wasm-1  meshlimit, one rule matching every path, 1e9 per second (never rejects),
#           one client (x-api-key fixed)
#   wasm-10k  the same rule, x-api-key rotating over 10,000 distinct clients
#   wasm-floor  meshlimit with no rules: the filter is called on every request but does
#           nothing (no host call). What any wasm filter costs in this Envoy, the floor
#           under wasm-1.
#
# Set-up: Envoy --concurrency 1 pinned to CPU 0, wrk (1 thread, $CONNECTIONS keep-alive
# connections) pinned to CPU 1. The route is an Envoy direct_response (200, 2 bytes), so
# no upstream shares the CPU and the figures are Envoy + filter only. Rounds interleave
# the cases (none, native, wasm-1, wasm-10k, none, ...) so drift hits every case alike;
# each figure is the median over rounds, with the per-round req/s range beside it. With
# 8 connections Envoy is saturated, so p50/p99 include queueing (latency ~ 8 / req/s);
# CONNECTIONS=1 shows the unloaded per-request latency instead. Any non-2xx answer or
# socket error makes the run fail.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-8}"
# Size of the response body (direct_response); larger bodies reach the filter in chunks.
BODY_BYTES="${BODY_BYTES:-2}"
BODY="$(head -c "$BODY_BYTES" /dev/zero | tr '\0' x)"
WARMUP="${WARMUP:-2}"
RUN_DIR="$ROOT/.run/bench"
CASES=(none native wasm-floor wasm-1 wasm-10k)
BASELINE="${BASELINE:-}"
if [[ -n "$BASELINE" ]]; then
  [[ -f "$BASELINE" ]] || { echo "error: BASELINE=$BASELINE is not a file" >&2; exit 1; }
  CASES+=(base-1 base-10k)
fi

if [[ "$(nproc)" -lt 2 ]]; then
  echo "warning: fewer than 2 CPUs; Envoy and wrk will share one" >&2
fi

echo "== building the filter"
BUILT="$(scripts/build-filter.sh)"
WASM="${WASM:-$BUILT}"
echo "  wasm: $WASM"

echo "== Envoy and wrk"
ENVOY="$(scripts/install-envoy.sh)"
if ! command -v wrk >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    apt-get install -y -qq wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
  else
    sudo apt-get install -y -qq wrk
  fi
fi
"$ENVOY" --version | sed 's/^/  /'
wrk --version 2>&1 | head -n1 | sed 's/^/  /' || true

rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

# --- Envoy configurations -------------------------------------------------------------

port_of() { # case -> listener port (admin is +100)
  case "$1" in none) echo 10200 ;; native) echo 10201 ;; wasm-1) echo 10202 ;; wasm-10k) echo 10203 ;; wasm-floor) echo 10204 ;; base-1) echo 10205 ;; base-10k) echo 10206 ;; esac
}

filters_for() {
  case "$1" in
    none) ;;
    native)
      cat <<'EOF'
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: bench_native
              token_bucket: { max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s }
              # Without these two the filter is installed but does nothing.
              filter_enabled:
                runtime_key: bench_native_enabled
                default_value: { numerator: 100, denominator: HUNDRED }
              filter_enforced:
                runtime_key: bench_native_enforced
                default_value: { numerator: 100, denominator: HUNDRED }
EOF
      ;;
    wasm-1 | wasm-10k | wasm-floor | base-1 | base-10k)
      local plugin='{"rules":[{"id":"bench","match":{"path":"*"},"limits":[{"window":"1s","max":1000000000}]}]}'
      [[ "$1" == wasm-floor ]] && plugin='{"rules":[]}'
      local module="$WASM"
      [[ "$1" == base-* ]] && module="$BASELINE"
      cat <<EOF
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: meshlimit
                root_id: meshlimit
                vm_config:
                  vm_id: meshlimit
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: "$module" } }
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '$plugin'
EOF
      ;;
  esac
}

write_config() { # case -> file
  local port admin
  port="$(port_of "$1")"
  admin=$((port + 100))
  cat <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $port } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            max_direct_response_body_size_bytes: $((BODY_BYTES + 1024))
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "$BODY" } }
          http_filters:
$(filters_for "$1")
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
EOF
}

# --- start every Envoy (idle ones cost ~nothing; no restarts between rounds) ----------

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for c in "${CASES[@]}"; do
  port="$(port_of "$c")"
  for p in "$port" $((port + 100)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "error: port $p is in use" >&2
      exit 1
    fi
  done
  write_config "$c" >"$RUN_DIR/$c.yaml"
  taskset -c 0 "$ENVOY" -c "$RUN_DIR/$c.yaml" --concurrency 1 --disable-hot-restart \
    --log-level warn >"$RUN_DIR/$c.log" 2>&1 &
  PIDS+=($!)
done

for c in "${CASES[@]}"; do
  admin=$(($(port_of "$c") + 100))
  for i in $(seq 300); do
    [[ "$(curl -s "http://127.0.0.1:$admin/ready" || true)" == LIVE* ]] && break
    if [[ $i == 300 ]]; then
      echo "error: Envoy for case $c not ready; log:" >&2
      tail -n 20 "$RUN_DIR/$c.log" >&2
      exit 1
    fi
    sleep 0.1
  done
done

keys_for() { [[ "$1" == *-10k ]] && echo 10000 || echo 1; }

pid_of() { # case -> Envoy pid
  local i
  for i in "${!CASES[@]}"; do
    if [[ "${CASES[$i]}" == "$1" ]]; then echo "${PIDS[$i]}"; fi
  done
}

cpu_ticks() { # pid -> utime+stime of the whole process, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

run_wrk() { # case seconds -> RESULT line, with the Envoy CPU time the run cost
  local c="$1" secs="$2" pid before after line
  pid="$(pid_of "$c")"
  before="$(cpu_ticks "$pid")"
  line="$(BENCH_KEYS="$(keys_for "$c")" taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${secs}s" \
    -s bench/wrk-keys.lua "http://127.0.0.1:$(port_of "$c")" | grep '^RESULT')"
  after="$(cpu_ticks "$pid")"
  echo "$line envoy_cpu_ticks=$((after - before))"
}

# Other work on the machine skews every figure: say how busy it was.
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== warm-up (${WARMUP}s per case: V8 tier-up, the 10k-client table filled)"
for c in "${CASES[@]}"; do run_wrk "$c" "$WARMUP" >/dev/null; done

echo "== $ROUNDS rounds x ${#CASES[@]} cases x ${DURATION}s, wrk -t1 -c$CONNECTIONS"
RESULTS="$RUN_DIR/results.txt"
: >"$RESULTS"
for r in $(seq "$ROUNDS"); do
  for c in "${CASES[@]}"; do
    line="$(run_wrk "$c" "$DURATION")"
    echo "case=$c round=$r $line" | tee -a "$RESULTS"
  done
done

echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg) (the bench itself adds ~2)"

# The native filter and meshlimit really ran on every request (and rejected none).
native_ok="$(curl -s "http://127.0.0.1:$(($(port_of native) + 100))/stats" \
  | awk -F': ' '/bench_native.http_local_rate_limit.ok/ {print $2}')"
wasm_allowed="$(curl -s "http://127.0.0.1:$(($(port_of wasm-10k) + 100))/stats/prometheus" \
  | awk '/^meshlimit_allowed_total/ {print $2}')"
echo "native filter: ${native_ok:-?} requests ok; meshlimit (wasm-10k Envoy): ${wasm_allowed:-?} allowed (metrics lag one flush)"

python3 - "$RESULTS" "$(getconf CLK_TCK)" <<'PY'
import re, statistics, sys
tick_us = 1e6 / int(sys.argv[2])
rows = {}
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    rows.setdefault(kv["case"], []).append(kv)
bad = [r for rs in rows.values() for r in rs if int(r["non2xx"]) or int(r["socket_errors"])]
med = {}
spread = {}
for case, rs in rows.items():
    rates = [int(r["requests"]) / (int(r["duration_us"]) / 1e6) for r in rs]
    p50 = statistics.median(int(r["p50_us"]) for r in rs)
    p99 = statistics.median(int(r["p99_us"]) for r in rs)
    # Envoy CPU time per request: what the filter costs, much less sensitive than
    # req/s to other work on the machine (it is not the wall clock).
    cpu = statistics.median(int(r["envoy_cpu_ticks"]) * tick_us / int(r["requests"]) for r in rs)
    med[case] = (statistics.median(rates), p50, p99, cpu)
    spread[case] = (min(rates), max(rates))
print()
print(f"{'case':<10} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'vs none':>8} {'vs native':>10}"
      f"  {'req/s min..max':>16} {'cpu us/req':>10} {'cpu vs none':>11}")
for case, (rps, p50, p99, cpu) in med.items():
    lo, hi = spread[case]
    print(f"{case:<10} {rps:>9.0f} {p50:>8.0f} {p99:>8.0f} "
          f"{rps / med['none'][0]:>8.2f} {rps / med['native'][0]:>10.2f}  {lo:>7.0f}..{hi:<7.0f}"
          f" {cpu:>10.1f} {med['none'][3] / cpu:>11.2f}")
print("(medians over rounds; ratios are median req/s relative to the case named;\n"
      " a wide min..max means other work on the machine disturbed the run;\n"
      " cpu us/req is Envoy's CPU time per request, 'cpu vs none' the throughput ratio\n"
      " it implies for a CPU-bound Envoy: none's cost divided by this case's)")
if bad:
    print(f"FAILED: {len(bad)} runs had non-2xx answers or socket errors", file=sys.stderr)
    sys.exit(1)
PY
