#!/usr/bin/env bash
# Throughput and latency cost of the meshlimit filter inside Envoy, measured with wrk, in
# local, global and strict scope; then the accuracy figures of global scope.
#
#   scripts/bench-filter.sh            5 rounds x 12 runs x 5 s (about 7 minutes)
#   ROUNDS=2 DURATION=2 scripts/bench-filter.sh     a quick look
#   SCENARIOS=1 scripts/bench-filter.sh             also the three-AZ scenarios 1-2 (root)
#   ONLY="wasm-10k global-10k" ROUNDS=15 scripts/bench-filter.sh
#                                                  some cases only, more rounds
#   BODY_BYTES=262144 scripts/bench-filter.sh      responses of 256 KB instead of 2 bytes
#   SPIN=1 ONLY="wasm-1 strict-1" scripts/bench-filter.sh
#                                                  every CPU kept out of its idle state by a
#                                                  SCHED_IDLE busy loop (it yields at once to
#                                                  any other thread): what a strict check
#                                                  costs without this VM's wake-ups from idle
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
#           one client (x-api-key fixed), scope local
#   wasm-10k  the same rule, x-api-key rotating over 10,000 distinct clients
#   wasm-floor  meshlimit with no rules: the filter is called on every request but does
#           nothing (no host call). What any wasm filter costs in this Envoy, the floor
#           under wasm-1.
#   global-1, global-10k  wasm-1 and wasm-10k with a `service` block, so the rule is in
#           global scope: each Envoy syncs (POST /v1/sync, every 1000 ms, the default)
#           with a real companion (meshlimit-service) on a real redis-server, both
#           started here on free ports, with a bearer token and a Redis password in
#           files only this user can read. After every global run the script checks in
#           Envoy's /stats/prometheus that meshlimit_sync_ok_total grew during it and
#           meshlimit_sync_failed_total is still 0, and that the companion never went
#           degraded (answering from its fallback instead of Redis): a global run that
#           did not sync with Redis measured nothing, so the run fails.
#   strict-1  the rule in strict scope, failure_mode closed: every request is paused for
#           one POST /v1/strict, which the companion decides in Redis (Lua). A failed
#           check would be a 429 and fail the run; the script also checks that
#           meshlimit_strict_allowed_total grew and no strict check failed.
#   companion (one-connection pass only)  no Envoy: wrk sends strict-1's check (the same
#           body the filter builds) straight to the companion's /v1/strict: the part of
#           strict scope's added latency that is the companion and Redis themselves.
#
# Set-up: every Envoy --concurrency 1, pinned to CPU 0 (all its threads: the worker that
# runs requests and the main thread whose VM sends the reports, so the sync's cost is in
# the figures); wrk (1 thread, keep-alive connections) pinned to CPU 1. The companion
# (--workers 1) and redis-server are pinned to SERVICE_CPUS, by default CPU 2 if the
# machine has one, else CPU 1 with wrk: never Envoy's CPU, because what is measured is
# what the filter costs Envoy, and in a deployment the companion and Redis run on other
# machines. For global scope they only answer one report per second per Envoy, so wrk
# loses nothing measurable; strict scope puts them on the request path, so with 8
# connections strict-1's throughput on a 2-core machine is bounded by CPU 1 (wrk,
# companion and Redis together), not by Envoy: its Envoy CPU per request is the fair
# figure there. The route is an Envoy direct_response (200, 2 bytes), so no upstream
# shares the CPU and the figures are Envoy + filter only. Rounds interleave the cases
# (none, native, ..., strict-1, none, ...) so drift hits every case alike; each figure is
# the median over rounds, with the per-round req/s range beside it; ratios between two
# cases are the median of their per-round ratios (each from the same round). Idle Envoys
# stay up between their turns (the global ones send an empty report per second: a few
# microseconds of CPU, on CPU 0 and the companion's).
#
# Two passes per round. With 8 connections (CONNECTIONS) Envoy is saturated: the
# throughput figures, and p50/p99 that are mostly queueing (latency ~ 8 / req/s). Then
# wasm-1, global-1, strict-1 and companion with ONE connection (LATENCY_CONNECTIONS): a
# request is only sent when the previous one is answered, nothing queues in Envoy, so
# strict-1's p99 minus wasm-1's (same round, same Envoy build, same rule, only the scope
# differs) is what the callout itself adds to a request: Envoy's HTTP client, the
# companion, one Redis script call, on loopback. That is the figure the strict target is
# about; under saturation the added p99 would mostly be the other 7 connections'
# requests waiting.
#
# Targets (printed as PASS/MISS; a benchmark reports figures and fails only on errors):
# global scope >= 0.97 of local scope's throughput (wasm-1 and wasm-10k), strict scope's
# added p99 < 1 ms on loopback. Any non-2xx answer, socket error, missing sync or failed
# strict check makes the run fail.
#
# Accuracy, after the rounds (everything above stopped first): the simulation's table
# (`cargo run -p meshlimit-sim --release`: the real core for N proxies in simulated
# time, 3 s), and with SCENARIOS=1 the three-AZ scenarios 1-2 (uniform and 90/5/5 load on
# three Envoys over a Redis Cluster, e2e/tests/three_az_global.rs, about 40 s): their
# accuracy lines. Those need root (network namespaces) and a machine where nobody else
# uses the az-* namespaces; the default run needs neither (root only to apt-get wrk if
# it is missing, through sudo).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-8}"
LATENCY_CONNECTIONS="${LATENCY_CONNECTIONS:-1}"
# Size of the response body (direct_response); larger bodies reach the filter in chunks.
BODY_BYTES="${BODY_BYTES:-2}"
BODY="$(head -c "$BODY_BYTES" /dev/zero | tr '\0' x)"
WARMUP="${WARMUP:-2}"
IDLE="${IDLE:-10}"
SCENARIOS="${SCENARIOS:-}"
[[ "$SCENARIOS" == 0 ]] && SCENARIOS=""
SPIN="${SPIN:-}"
[[ "$SPIN" == 0 ]] && SPIN=""
if [[ -z "${SERVICE_CPUS:-}" ]]; then
  if [[ "$(nproc)" -ge 3 ]]; then SERVICE_CPUS=2; else SERVICE_CPUS=1; fi
fi
RUN_DIR="$ROOT/.run/bench"
CASES=(none native wasm-floor wasm-1 wasm-10k)
BASELINE="${BASELINE:-}"
if [[ -n "$BASELINE" ]]; then
  [[ -f "$BASELINE" ]] || { echo "error: BASELINE=$BASELINE is not a file" >&2; exit 1; }
  CASES+=(base-1 base-10k)
fi
CASES+=(global-1 global-10k strict-1)
# ONLY="wasm-10k global-10k": just these cases (more rounds in the same time, for one
# comparison).
if [[ -n "${ONLY:-}" ]]; then
  kept=()
  for c in "${CASES[@]}"; do [[ " $ONLY " == *" $c "* ]] && kept+=("$c"); done
  for c in $ONLY; do [[ " ${kept[*]} " == *" $c "* ]] || { echo "error: ONLY: no case $c" >&2; exit 1; }; done
  CASES=("${kept[@]}")
fi
# The one-connection pass: local vs global vs strict, one client each, and the strict
# check alone (wrk straight to the companion).
LATENCY_CASES=()
for c in wasm-1 global-1 strict-1; do
  [[ " ${CASES[*]} " == *" $c "* ]] && LATENCY_CASES+=("$c")
done
[[ " ${CASES[*]} " == *" strict-1 "* ]] && LATENCY_CASES+=(companion)

if [[ "$(nproc)" -lt 2 ]]; then
  echo "warning: fewer than 2 CPUs; Envoy and wrk will share one" >&2
fi
if [[ -n "$SCENARIOS" ]]; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "error: SCENARIOS=1 runs the three-AZ scenarios, which need root (network namespaces)" >&2
    exit 1
  fi
  if ip netns list 2>/dev/null | grep -qE '^az-[abc]\b'; then
    echo "error: network namespaces az-* exist (another three-AZ run?); SCENARIOS=1 needs them free" >&2
    exit 1
  fi
fi

echo "== building the filter, the companion and the simulation"
BUILT="$(scripts/build-filter.sh)"
WASM="${WASM:-$BUILT}"
echo "  wasm: $WASM"
cargo build --release -q -p meshlimit-service --bin meshlimit-service -p meshlimit-sim
SERVICE_BIN="$ROOT/target/release/meshlimit-service"
if [[ -n "$SCENARIOS" ]]; then
  cargo test --release -q -p meshlimit-e2e --test three_az_global --no-run
fi

echo "== Envoy, wrk, redis-server"
ENVOY="$(scripts/install-envoy.sh)"
if ! command -v wrk >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    apt-get install -y -qq wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
  else
    sudo apt-get install -y -qq wrk
  fi
fi
scripts/install-redis.sh >/dev/null
"$ENVOY" --version | sed 's/^/  /'
wrk --version 2>&1 | head -n1 | sed 's/^/  /' || true
redis-server --version | sed 's/^/  /'

rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

# --- Envoy configurations -------------------------------------------------------------

port_of() { # case -> listener port (admin is +100)
  case "$1" in
    none) echo 10200 ;; native) echo 10201 ;; wasm-1) echo 10202 ;; wasm-10k) echo 10203 ;;
    wasm-floor) echo 10204 ;; base-1) echo 10205 ;; base-10k) echo 10206 ;;
    global-1) echo 10207 ;; global-10k) echo 10208 ;; strict-1) echo 10209 ;;
  esac
}

# The rule every wasm case charges: it matches every path and never rejects.
RULE_MATCH='"id":"bench","match":{"path":"*"},"limits":[{"window":"1s","max":1000000000}]'
# The companion, as the shipped envoy/envoy.yaml declares it: sync interval and report
# deadline left at their defaults (1000 ms, 200 ms), the token from Envoy's environment.
SERVICE_BLOCK='"service":{"cluster":"meshlimit_service","token_env":"ML_TOKEN"}'

plugin_for() {
  case "$1" in
    wasm-floor) echo '{"rules":[]}' ;;
    global-*) echo "{$SERVICE_BLOCK,\"rules\":[{$RULE_MATCH}]}" ;;
    strict-*) echo "{$SERVICE_BLOCK,\"rules\":[{$RULE_MATCH,\"scope\":\"strict\",\"failure_mode\":\"closed\"}]}" ;;
    *) echo "{\"rules\":[{$RULE_MATCH}]}" ;;
  esac
}

uses_service() { [[ "$1" == global-* || "$1" == strict-* ]]; }

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
    *)
      local module="$WASM" env=""
      [[ "$1" == base-* ]] && module="$BASELINE"
      uses_service "$1" && env='
                  environment_variables: { host_env_keys: [ML_TOKEN] }'
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
                  code: { local: { filename: "$module" } }$env
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '$(plugin_for "$1")'
EOF
      ;;
  esac
}

write_config() { # case -> file
  local port admin
  port="$(port_of "$1")"
  admin=$((port + 100))
  # Each Envoy its own node.id: the companion counts them as distinct proxies.
  cat <<EOF
node: { id: bench-$1, locality: { zone: bench } }
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
  if uses_service "$1"; then
    cat <<EOF
  clusters:
  - name: meshlimit_service
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: meshlimit_service
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $SERVICE_PORT } } }
EOF
  fi
}

# --- processes: Redis, the companion, every Envoy (no restarts between rounds) --------

PIDS=()
declare -A ENVOY_PID
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # a port the kernel just handed out (another process could take it first)
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
random_secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Secrets in files only this user can read (never on a command line, where ps shows
# them): Redis's password (requirepass) and the companion's bearer token. Envoy reads the
# token from its environment (ML_TOKEN, vm_config host_env_keys).
REDIS_PORT="$(free_port)"
SERVICE_PORT="$(free_port)"
ML_TOKEN="$(random_secret)"
export ML_TOKEN
REDIS_PASSWORD="$(random_secret)"
(
  umask 077
  printf '%s\n' "$ML_TOKEN" >"$RUN_DIR/token"
  printf '%s\n' "$REDIS_PASSWORD" >"$RUN_DIR/redis.password"
  printf 'authorization: Bearer %s\n' "$ML_TOKEN" >"$RUN_DIR/auth.header"
  cat >"$RUN_DIR/redis.conf" <<EOF
bind 127.0.0.1
port $REDIS_PORT
dir $RUN_DIR
save ""
appendonly no
requirepass $REDIS_PASSWORD
EOF
)
# redis-cli takes the password from REDISCLI_AUTH, not from its arguments.
redis_cli() { REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

echo "== redis-server :$REDIS_PORT and the companion :$SERVICE_PORT, on CPU $SERVICE_CPUS"
taskset -c "$SERVICE_CPUS" redis-server "$RUN_DIR/redis.conf" >"$RUN_DIR/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for i in $(seq 100); do
  [[ "$(redis_cli ping 2>/dev/null || true)" == PONG ]] && break
  if [[ $i == 100 ]]; then
    echo "error: redis-server not answering; log:" >&2
    tail -n 20 "$RUN_DIR/redis.log" >&2
    exit 1
  fi
  sleep 0.1
done
taskset -c "$SERVICE_CPUS" "$SERVICE_BIN" --listen "127.0.0.1:$SERVICE_PORT" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" --redis-password-file "$RUN_DIR/redis.password" \
  --token-file "$RUN_DIR/token" --workers 1 --max-reports-in-flight 3 \
  >"$RUN_DIR/service.log" 2>&1 &
SERVICE_PID=$!
PIDS+=("$SERVICE_PID")
for i in $(seq 100); do
  # Ready means its Redis answered: not degraded.
  [[ "$(curl -s "http://127.0.0.1:$SERVICE_PORT/readyz" || true)" == *'"ready":true'* ]] && break
  if [[ $i == 100 ]]; then
    echo "error: the companion is not ready; log:" >&2
    tail -n 20 "$RUN_DIR/service.log" >&2
    exit 1
  fi
  sleep 0.1
done

for c in "${CASES[@]}"; do
  port="$(port_of "$c")"
  for p in "$port" $((port + 100)); do
    if port_in_use "$p"; then
      echo "error: port $p is in use" >&2
      exit 1
    fi
  done
  write_config "$c" >"$RUN_DIR/$c.yaml"
  taskset -c 0 "$ENVOY" -c "$RUN_DIR/$c.yaml" --concurrency 1 --disable-hot-restart \
    --log-level warn >"$RUN_DIR/$c.log" 2>&1 &
  ENVOY_PID[$c]=$!
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

cpu_ticks() { # pid... -> utime+stime of the whole processes, in clock ticks
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}

envoy_metric() { # case name -> the counter or gauge in Envoy's /stats/prometheus (0 if absent)
  curl -s "http://127.0.0.1:$(($(port_of "$1") + 100))/stats/prometheus" \
    | awk -v n="$2" '$1 == n || $1 == n "{}" {v = $2} END {print v + 0}'
}

service_metric() { # name -> the companion's metric (0 if absent)
  curl -s -H "@$RUN_DIR/auth.header" "http://127.0.0.1:$SERVICE_PORT/metrics" \
    | awk -v m="$1" '$1 == m {v = $2} END {print v + 0}'
}

fail() {
  echo "FAILED: $*" >&2
  exit 1
}

# The counter a case's proof of work is read from: the reports it synced, or the strict
# checks the companion allowed.
progress_metric() {
  case "$1" in
    global-*) echo meshlimit_sync_ok_total ;;
    strict-*) echo meshlimit_strict_allowed_total ;;
  esac
}

# After a global or strict run: it really synced / checked with the companion and Redis.
# The filter adds its counters to Envoy's once a second, so growth may show up to a
# second late: wait for it up to 3 s.
check_service_run() { # case counter-before
  local c="$1" before="$2" metric now i
  metric="$(progress_metric "$c")"
  for i in $(seq 30); do
    now="$(envoy_metric "$c" "$metric")"
    [[ "$now" -gt "$before" ]] && break
    [[ $i == 30 ]] && fail "$c: $metric did not grow during the run ($before -> $now): it measured no sync with the companion"
    sleep 0.1
  done
  # The warm-up fills the 10k-client table: its first reports are large, and the
  # companion may shed one (503 overloaded; the filter sends its counts with the next).
  # Not the measurement: failures are counted from after it (see below).
  [[ -n "${WARMING:-}" ]] && return
  local m expect
  for m in meshlimit_sync_failed_total meshlimit_strict_failed_open_total \
    meshlimit_strict_failed_closed_total meshlimit_strict_failed_local_total; do
    expect=0
    [[ $m == meshlimit_sync_failed_total ]] && expect="${SYNC_FAILED_AT_START[$c]}"
    if [[ "$(envoy_metric "$c" "$m")" != "$expect" ]]; then
      curl -s -H "@$RUN_DIR/auth.header" "http://127.0.0.1:$SERVICE_PORT/metrics" \
        | grep -E '^meshlimit_(requests_total|degraded)' >&2 || true
      fail "$c: $m is $(envoy_metric "$c" "$m"), not $expect (the companion's answers above; logs in $RUN_DIR)"
    fi
  done
  [[ "$(service_metric meshlimit_degraded_transitions_total)" == 0 ]] \
    || fail "the companion went degraded (answered from its fallback, not Redis): see $RUN_DIR/service.log"
}

run_wrk() { # case connections seconds -> RESULT line, with the CPU time the run cost
  local c="$1" conns="$2" secs="$3" pid before svc_before after svc_after line progress=0 \
    syncs=0 entries=0 latency=0 d_entries d_latency d_syncs
  if [[ "$c" == companion ]]; then
    # No Envoy: the strict check strict-1's filter sends, straight to the companion.
    before="$(cpu_ticks "$SERVICE_PID" "$REDIS_PID")"
    line="$(BENCH_TOKEN="$ML_TOKEN" taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" \
      -s bench/wrk-companion.lua "http://127.0.0.1:$SERVICE_PORT/v1/strict" | grep '^RESULT')"
    after="$(cpu_ticks "$SERVICE_PID" "$REDIS_PID")"
    echo "$line envoy_cpu_ticks=0 service_cpu_ticks=$((after - before)) syncs=0 sync_entries=0 sync_latency_ms=0"
    return
  fi
  pid="${ENVOY_PID[$c]}"
  if uses_service "$c"; then
    progress="$(envoy_metric "$c" "$(progress_metric "$c")")"
    syncs="$(envoy_metric "$c" meshlimit_sync_ok_total)"
    entries="$(envoy_metric "$c" meshlimit_sync_entries_total)"
    latency="$(envoy_metric "$c" meshlimit_sync_latency_ms_total)"
  fi
  before="$(cpu_ticks "$pid")"
  svc_before="$(cpu_ticks "$SERVICE_PID" "$REDIS_PID")"
  line="$(BENCH_KEYS="$(keys_for "$c")" taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" \
    -s bench/wrk-keys.lua "http://127.0.0.1:$(port_of "$c")" | grep '^RESULT')"
  after="$(cpu_ticks "$pid")"
  svc_after="$(cpu_ticks "$SERVICE_PID" "$REDIS_PID")"
  d_syncs=0 d_entries=0 d_latency=0
  if uses_service "$c"; then
    check_service_run "$c" "$progress"
    # Approximate (the counters lag up to a second): for the report sizes printed below.
    d_syncs=$(($(envoy_metric "$c" meshlimit_sync_ok_total) - syncs))
    d_entries=$(($(envoy_metric "$c" meshlimit_sync_entries_total) - entries))
    d_latency=$(($(envoy_metric "$c" meshlimit_sync_latency_ms_total) - latency))
  fi
  echo "$line envoy_cpu_ticks=$((after - before)) service_cpu_ticks=$((svc_after - svc_before))" \
    "syncs=$d_syncs sync_entries=$d_entries sync_latency_ms=$d_latency"
}

# Every VM of an Envoy (--concurrency 1: the worker's and the main thread's) sends a
# heartbeat when it is configured; the companion handles 3 reports at once here
# (--max-reports-in-flight 3: one per Envoy; 2 by default) and answers the others of the
# three Envoys starting together 503 (overloaded, Retry-After 1). Those are start-up, not the measurement: each Envoy
# must have synced once, and from then on no sync may fail.
declare -A SYNC_FAILED_AT_START
for c in "${CASES[@]}"; do
  uses_service "$c" || continue
  for i in $(seq 50); do
    [[ "$(envoy_metric "$c" meshlimit_sync_ok_total)" -gt 0 ]] && break
    [[ $i == 50 ]] && fail "$c: no sync answered within 5 s of start-up (logs in $RUN_DIR)"
    sleep 0.1
  done
done
# Every VM adds its counters to Envoy's on its own tick, once a second: let them all.
sleep 1.2
for c in "${CASES[@]}"; do
  uses_service "$c" || continue
  SYNC_FAILED_AT_START[$c]="$(envoy_metric "$c" meshlimit_sync_failed_total)"
  echo "  $c: synced; start-up syncs failed: ${SYNC_FAILED_AT_START[$c]}"
done
echo "  the companion answered $(service_metric 'meshlimit_requests_total{endpoint="sync",status="503"}')" \
  "start-up syncs 503 (overloaded), $(service_metric 'meshlimit_requests_total{endpoint="sync",status="200"}') 200"

# Other work on the machine skews every figure: say how busy it was.
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# SPIN=1: a thread that wakes on an idle CPU of this VM waits for the CPU to leave its
# idle state, which a strict check pays on every hop (Envoy -> companion -> Redis and
# back). A SCHED_IDLE busy loop per CPU keeps them out of it and yields at once to any
# other thread (it adds 1 per CPU to the load average).
if [[ -n "$SPIN" ]]; then
  for cpu in $(seq 0 $(($(nproc) - 1))); do
    taskset -c "$cpu" chrt -i 0 bash -c 'while :; do :; done' &
    PIDS+=("$!")
  done
  echo "== SPIN=1: a SCHED_IDLE busy loop on each of CPUs 0-$(($(nproc) - 1))"
fi
echo "== warm-up (${WARMUP}s per case: V8 tier-up, the 10k-client table filled and reported)"
WARMING=1
for c in "${CASES[@]}"; do run_wrk "$c" "$CONNECTIONS" "$WARMUP" >/dev/null; done
for c in "${LATENCY_CASES[@]}"; do run_wrk "$c" "$LATENCY_CONNECTIONS" 1 >/dev/null; done
WARMING=
sleep 1.2
for c in "${CASES[@]}"; do
  uses_service "$c" || continue
  failed="$(envoy_metric "$c" meshlimit_sync_failed_total)"
  echo "  $c: syncs failed in the warm-up: $((failed - SYNC_FAILED_AT_START[$c])); from here on none may"
  SYNC_FAILED_AT_START[$c]="$failed"
done

echo "== $ROUNDS rounds x (${#CASES[@]} cases at -c$CONNECTIONS + ${#LATENCY_CASES[@]} at" \
  "-c$LATENCY_CONNECTIONS) x ${DURATION}s, wrk -t1"
RESULTS="$RUN_DIR/results.txt"
: >"$RESULTS"
for r in $(seq "$ROUNDS"); do
  for c in "${CASES[@]}"; do
    line="$(run_wrk "$c" "$CONNECTIONS" "$DURATION")"
    echo "case=$c conns=$CONNECTIONS round=$r $line" | tee -a "$RESULTS"
  done
  for c in "${LATENCY_CASES[@]}"; do
    line="$(run_wrk "$c" "$LATENCY_CONNECTIONS" "$DURATION")"
    echo "case=$c conns=$LATENCY_CONNECTIONS round=$r $line" | tee -a "$RESULTS"
  done
done

echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg) (the bench itself adds ~2)"

# What an Envoy costs with no traffic at all, over IDLE seconds: for a global one that is
# its sync (an empty report per second in steady state, as the -c8 runs show too) and
# the filter's ticks, the work off the request path, measured without wrk's noise.
runtime_ns() { # pid -> CPU time of all its threads, in ns (schedstat: finer than ticks)
  cat /proc/"$1"/task/*/schedstat | awk '{t += $1} END {printf "%.0f\n", t}'
}
echo "== idle: ${IDLE}s without traffic"
declare -A IDLE_BEFORE
for c in "${CASES[@]}"; do IDLE_BEFORE[$c]="$(runtime_ns "${ENVOY_PID[$c]}")"; done
idle_start="$(date +%s%N)"
sleep "$IDLE"
idle_ns=$(($(date +%s%N) - idle_start))
for c in "${CASES[@]}"; do
  echo "idle case=$c cpu_ns=$(($(runtime_ns "${ENVOY_PID[$c]}") - IDLE_BEFORE[$c])) wall_ns=$idle_ns"
done >"$RUN_DIR/idle.txt"

# No sync failed after start-up, not even while a global Envoy waited for its turn.
for c in "${CASES[@]}"; do
  uses_service "$c" || continue
  failed="$(envoy_metric "$c" meshlimit_sync_failed_total)"
  [[ "$failed" == "${SYNC_FAILED_AT_START[$c]}" ]] \
    || fail "$c: $((failed - SYNC_FAILED_AT_START[$c])) syncs failed after start-up (logs in $RUN_DIR)"
done

# The native filter and meshlimit really ran on every request (and rejected none).
if [[ -n "${ENVOY_PID[native]:-}" ]]; then
  native_ok="$(curl -s "http://127.0.0.1:$(($(port_of native) + 100))/stats" \
    | awk -F': ' '/bench_native.http_local_rate_limit.ok/ {print $2}')"
  echo "native filter: ${native_ok:-?} requests ok"
fi
echo "meshlimit allowed / rejected (metrics lag one flush):"
for c in "${CASES[@]}"; do
  [[ "$c" == wasm-1* || "$c" == global-* || "$c" == strict-* ]] || continue
  echo "  $c: $(envoy_metric "$c" meshlimit_allowed_total) / $(envoy_metric "$c" meshlimit_rejected_total)," \
    "syncs ok $(envoy_metric "$c" meshlimit_sync_ok_total)" \
    "failed $(envoy_metric "$c" meshlimit_sync_failed_total) (${SYNC_FAILED_AT_START[$c]:-0} at start-up)," \
    "strict allowed $(envoy_metric "$c" meshlimit_strict_allowed_total)"
done
echo "companion: $(service_metric meshlimit_sync_reports_total) reports," \
  "$(service_metric meshlimit_sync_entries_total) entries, live proxies $(service_metric meshlimit_live_proxies)," \
  "degraded transitions $(service_metric meshlimit_degraded_transitions_total);" \
  "redis keys: $(redis_cli dbsize)"

bench_status=0
python3 - "$RESULTS" "$(getconf CLK_TCK)" "$CONNECTIONS" "$LATENCY_CONNECTIONS" "$RUN_DIR/idle.txt" <<'PY' || bench_status=$?
import re, statistics, sys
tick_us = 1e6 / int(sys.argv[2])
LOADED, SERIAL = sys.argv[3], sys.argv[4]
rows = {}
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    rows.setdefault((kv["case"], kv["conns"]), []).append(kv)
# CPU ms per second of an Envoy without traffic.
idle = {}
for line in open(sys.argv[5]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    idle[kv["case"]] = int(kv["cpu_ns"]) / 1e6 / (int(kv["wall_ns"]) / 1e9)
bad = [r for rs in rows.values() for r in rs if int(r["non2xx"]) or int(r["socket_errors"])]

def rate(r): return int(r["requests"]) / (int(r["duration_us"]) / 1e6)
# Envoy CPU time per request: what the filter costs, much less sensitive than req/s to
# other work on the machine (it is not the wall clock).
def cpu(r): return int(r["envoy_cpu_ticks"]) * tick_us / int(r["requests"])
def svc_cpu(r): return int(r["service_cpu_ticks"]) * tick_us / int(r["requests"])

med = {}
for key, rs in rows.items():
    rates = [rate(r) for r in rs]
    med[key] = dict(
        rps=statistics.median(rates), lo=min(rates), hi=max(rates),
        p50=statistics.median(int(r["p50_us"]) for r in rs),
        p99=statistics.median(int(r["p99_us"]) for r in rs),
        cpu=statistics.median(cpu(r) for r in rs),
        svc=statistics.median(svc_cpu(r) for r in rs),
    )

def paired(a, b, f):
    """Per-round f(a's run, b's run) for two cases of the same pass: median, min, max."""
    by_round = {r["round"]: r for r in rows.get(b, [])}
    vals = [f(r, by_round[r["round"]]) for r in rows.get(a, []) if r["round"] in by_round]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None

def table(conns, refs):
    cases = [k for k in rows if k[1] == conns]
    head = f"{'case':<11} {'req/s':>9} {'p50 us':>8} {'p99 us':>8}"
    head += "".join(f" {'vs ' + n:>9}" for n in refs)
    head += f"  {'req/s min..max':>16} {'cpu us/req':>10} {'svc us/req':>10}"
    print(head)
    for key in cases:
        m = med[key]
        line = f"{key[0]:<11} {m['rps']:>9.0f} {m['p50']:>8.0f} {m['p99']:>8.0f}"
        line += "".join(f" {m['rps'] / med[(n, conns)]['rps']:>9.2f}" for n in refs)
        svc = f"{m['svc']:>10.1f}" if key[0].startswith(("global", "strict", "companion")) else f"{'':>10}"
        cpu = f"{'-':>10}" if key[0] == "companion" else f"{m['cpu']:>10.1f}"
        line += f"  {m['lo']:>7.0f}..{m['hi']:<7.0f} {cpu} {svc}"
        print(line)

print()
print(f"-- wrk -c{LOADED} (Envoy saturated: throughput; latencies are mostly queueing)")
table(LOADED, [n for n in ("none", "native") if (n, LOADED) in rows])
print(f"\n-- wrk -c{SERIAL} (one request at a time: latency without queueing)")
table(SERIAL, [])
print("(medians over rounds; 'vs' columns are median req/s relative to the case named;\n"
      " a wide min..max means other work on the machine disturbed the run;\n"
      " cpu us/req is Envoy's CPU time per request (worker and main thread: the sync\n"
      " included); svc us/req the companion's and Redis's, for the cases that use them;\n"
      " companion is wrk straight to the companion's /v1/strict, no Envoy)")

def syncs(case):
    rs = rows.get((case, LOADED), [])
    n = sum(int(r["syncs"]) for r in rs)
    if n:
        e = sum(int(r["sync_entries"]) for r in rs) / n
        lat = sum(int(r["sync_latency_ms"]) for r in rs) / n
        per_round = " ".join(f"{int(r['sync_entries']) / max(int(r['syncs']), 1):.0f}" for r in rs)
        print(f"{case}: {n} reports during the -c{LOADED} runs, {e:.1f} entries per report"
              f" (by round: {per_round}), {lat:.1f} ms per report (mean, send to answer)")
print()
for c in ("global-1", "global-10k"):
    syncs(c)

print("Envoy CPU without traffic (ms per second): "
      + ", ".join(f"{c} {v:.2f}" for c, v in idle.items()))

print("\n-- targets")
for g, l in (("global-1", "wasm-1"), ("global-10k", "wasm-10k")):
    t = paired((g, LOADED), (l, LOADED), lambda a, b: rate(a) / rate(b))
    c = paired((g, LOADED), (l, LOADED), lambda a, b: cpu(b) / cpu(a))
    if t:
        print(f"{g} / {l} throughput: {t[0]:.3f} (rounds {t[1]:.3f}..{t[2]:.3f}), target >= 0.97:"
              f" {'PASS' if t[0] >= 0.97 else 'MISS'};"
              f" implied by Envoy CPU per request: {c[0]:.3f} ({c[1]:.3f}..{c[2]:.3f})"
              f" {'PASS' if c[0] >= 0.97 else 'MISS'}")
        # The sync's own cost, from the idle Envoys: the share of a saturated Envoy's
        # CPU it takes, so the throughput it can cost at most.
        if g in idle and l in idle:
            off = (idle[g] - idle[l]) / 1000
            print(f"  the sync off the request path, idle: {idle[g]:.2f} vs {idle[l]:.2f} ms of CPU"
                  f" per second: {off * 100:+.2f} % of Envoy's CPU, a throughput ratio of"
                  f" {1 - off:.4f} at most")
p99 = paired(("strict-1", SERIAL), ("wasm-1", SERIAL), lambda a, b: int(a["p99_us"]) - int(b["p99_us"]))
p50 = paired(("strict-1", SERIAL), ("wasm-1", SERIAL), lambda a, b: int(a["p50_us"]) - int(b["p50_us"]))
if p99:
    print(f"strict-1 added latency over wasm-1 at -c{SERIAL}: p99 {p99[0]:+.0f} us (rounds"
          f" {p99[1]:+.0f}..{p99[2]:+.0f}), p50 {p50[0]:+.0f} us; target p99 < 1000 us:"
          f" {'PASS' if p99[0] < 1000 else 'MISS'}")
direct = med.get(("companion", SERIAL))
if direct and p99:
    print(f"  of which the companion and Redis alone (wrk straight to /v1/strict): p50"
          f" {direct['p50']:.0f} us, p99 {direct['p99']:.0f} us")
g99 = paired(("global-1", SERIAL), ("wasm-1", SERIAL), lambda a, b: int(a["p99_us"]) - int(b["p99_us"]))
if g99:
    print(f"global-1 added p99 over wasm-1 at -c{SERIAL}: {g99[0]:+.0f} us (rounds {g99[1]:+.0f}..{g99[2]:+.0f})")
s = paired(("strict-1", LOADED), ("wasm-1", LOADED), lambda a, b: rate(a) / rate(b))
sc = paired(("strict-1", LOADED), ("wasm-1", LOADED), lambda a, b: cpu(b) / cpu(a))
if s:
    print(f"strict-1 / wasm-1 throughput at -c{LOADED}: {s[0]:.3f} ({s[1]:.3f}..{s[2]:.3f});"
          f" implied by Envoy CPU per request: {sc[0]:.3f}")
if bad:
    print(f"FAILED: {len(bad)} runs had non-2xx answers or socket errors", file=sys.stderr)
    sys.exit(1)
PY
[[ $bench_status == 0 ]] || exit "$bench_status"

# --- accuracy: nothing of the above runs any more -------------------------------------
cleanup
trap cleanup EXIT

echo
echo "== accuracy: the simulation (cargo run -p meshlimit-sim --release; docs/global-limits.md)"
cargo run -q --release -p meshlimit-sim

if [[ -n "$SCENARIOS" ]]; then
  echo
  echo "== accuracy: three AZs, scenarios 1-2 (MESHLIMIT_SCENARIOS=1 cargo test --release -p meshlimit-e2e --test three_az_global)"
  log="$RUN_DIR/three-az.log"
  scen_status=0
  ENVOY_BIN="$ENVOY" MESHLIMIT_SCENARIOS=1 cargo test -q --release -p meshlimit-e2e \
    --test three_az_global -- --nocapture --test-threads=1 >"$log" 2>&1 || scen_status=$?
  grep -F 'accuracy' "$log" || true
  # A scenario out of its bound (±3 %) is a miss, printed; anything else failing (no
  # accuracy line at all, errors or 5xx during the load) is an error.
  if ! grep -qF 'accuracy' "$log"; then
    tail -n 30 "$log" >&2
    fail "the three-AZ scenarios printed no accuracy (log: $log)"
  fi
  if grep -F '[FAIL]' "$log" | grep -vqF 'accuracy'; then
    grep -F '[FAIL]' "$log" >&2
    fail "the three-AZ scenarios failed (log: $log)"
  fi
  if [[ $scen_status != 0 ]]; then
    echo "scenarios 1-2: MISS (out of the ±3 % bound, marked FAIL above; log: $log)"
  else
    echo "scenarios 1-2: within ±3 % of one exact bucket: PASS"
  fi
fi
