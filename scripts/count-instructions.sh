#!/usr/bin/env bash
# Instructions per request of Envoy with the meshlimit filter, counted with callgrind:
# stable where wall-clock figures swing by ±30% on shared machines.
#
#   scripts/count-instructions.sh                       the current build (target/meshlimit.wasm)
#   scripts/count-instructions.sh none a.wasm b.wasm    no filter, then each module given
#   SCOPE=global scripts/count-instructions.sh          the rule in global scope
#
# For each case: Envoy (--concurrency 1, a direct_response route) runs under
# `valgrind --tool=callgrind`, once for N1 and once for N2 requests sent on one
# keep-alive connection with a fixed x-api-key, against one rule matching every path
# with a limit that never refuses and `x-ratelimit` headers. The summaries of all
# threads are added up; (I(N2) - I(N1)) / (N2 - N1) is the cost of one request, with
# start-up and V8's background compilation of the first requests cancelled out.
# A case takes 1-4 minutes.
#
# SCOPE=global: the same rule in global scope, with a `service` block and a companion
# (meshlimit-service, in-memory store: what Envoy executes does not depend on the store)
# started here. The sync interval is 60 s, so no report falls between the two counts
# (the deadline 30 s: everything is slow under valgrind; a run counts only once the
# start-up sync was answered, so the rule is at its share, not in a failure mode):
# under valgrind a run lasts many times longer than natively, and a per-second report
# would be counted as far more per request than it costs. What is counted is global
# scope's request path; the reports' cost is what scripts/bench-filter.sh measures on
# idle Envoys (CPU per second).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N1="${N1:-3000}"
N2="${N2:-5000}"
SCOPE="${SCOPE:-local}"
RULE='"id":"all","match":{"path":"*"},"key":["header:x-api-key"],"limits":[{"window":"1s","max":1000000000}]'
case "$SCOPE" in
  local) RULES="{\"rules\":[{$RULE}],\"headers\":\"x-ratelimit\"}" ;;
  global) RULES="{\"service\":{\"cluster\":\"meshlimit_service\",\"token_env\":\"ML_TOKEN\",\"sync_interval_ms\":60000,\"timeout_ms\":30000},\"rules\":[{$RULE}],\"headers\":\"x-ratelimit\"}" ;;
  *) echo "SCOPE=$SCOPE: local or global" >&2; exit 2 ;;
esac
RUN_DIR="$ROOT/.run/count"
mkdir -p "$RUN_DIR"
ENVOY="$(scripts/install-envoy.sh)"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVICE_PORT="" VM_ENV="" NODE=""
if [[ "$SCOPE" == global ]]; then
  # The companion's token from Envoy's environment; node.id is the proxy's identity.
  VM_ENV='
                        environment_variables: { host_env_keys: [ML_TOKEN] }'
  NODE='node: { id: count, locality: { zone: count } }'
  cargo build --release -q -p meshlimit-service --bin meshlimit-service
  SERVICE_PORT="$(free_port)"
  ML_TOKEN="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export ML_TOKEN
  (umask 077 && printf '%s\n' "$ML_TOKEN" >"$RUN_DIR/token")
  # Every VM sends a heartbeat when configured, all at once: more reports in flight
  # than the default 2, so none is refused at start-up.
  target/release/meshlimit-service --listen "127.0.0.1:$SERVICE_PORT" \
    --token-file "$RUN_DIR/token" --max-reports-in-flight 8 >"$RUN_DIR/service.log" 2>&1 &
  SERVICE_PID=$!
  trap 'kill "$SERVICE_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:$SERVICE_PORT/readyz" >/dev/null && break
    sleep 0.1
  done
fi

cases=("$@")
if [[ ${#cases[@]} -eq 0 ]]; then
  cases=("$(scripts/build-filter.sh)")
fi

config() { # $1 = wasm path or "none", $2 = port, $3 = admin port
  local filters=""
  if [[ "$1" != none ]]; then
    filters=$(cat <<EOF
                - name: envoy.filters.http.wasm
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                    config:
                      name: meshlimit
                      root_id: meshlimit
                      configuration:
                        "@type": type.googleapis.com/google.protobuf.StringValue
                        value: '$RULES'
                      vm_config:
                        vm_id: meshlimit
                        runtime: envoy.wasm.runtime.v8
                        code: { local: { filename: $1 } }$VM_ENV
EOF
)
  fi
  cat <<EOF
$NODE
admin: { address: { socket_address: { address: 127.0.0.1, port_value: $3 } } }
static_resources:
  listeners:
    - name: main
      address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: count
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          direct_response: { status: 200, body: { inline_string: "ok" } }
                http_filters:
$filters
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
EOF
  if [[ -n "$SERVICE_PORT" ]]; then
    cat <<EOF
  clusters:
    - name: meshlimit_service
      type: STATIC
      connect_timeout: 30s
      load_assignment:
        cluster_name: meshlimit_service
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $SERVICE_PORT } } }
EOF
  fi
}

# Total instructions of one Envoy run serving $2 requests, for case $1.
count() {
  local port admin out
  port="$(free_port)"
  admin="$(free_port)"
  out="$RUN_DIR/cg.$$"
  rm -f "$out".*
  config "$1" "$port" "$admin" >"$RUN_DIR/envoy.yaml"
  valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file="$out.%p" \
    "$ENVOY" -c "$RUN_DIR/envoy.yaml" --concurrency 1 --disable-hot-restart \
    --log-level error >"$RUN_DIR/valgrind.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    [[ "$(curl -s "http://127.0.0.1:$admin/ready" || true)" == LIVE* ]] && break
    sleep 1
  done
  if [[ -n "$SERVICE_PORT" ]]; then
    local stats=""
    for _ in $(seq 120); do
      stats="$(curl -s "http://127.0.0.1:$admin/stats/prometheus" || true)"
      grep -qE '^meshlimit_sync_ok_total(\{\})? [1-9]' <<<"$stats" && break
      sleep 1
    done
    if ! grep -qE '^meshlimit_sync_ok_total(\{\})? [1-9]' <<<"$stats"; then
      echo "error: the filter did not sync with the companion:" >&2
      grep -E '^meshlimit_sync' <<<"$stats" >&2 || true
      kill -TERM "$pid"
      exit 1
    fi
  fi
  # One curl process, one keep-alive connection, $2 requests.
  local urls=()
  for _ in $(seq "$2"); do urls+=("http://127.0.0.1:$port/x"); done
  curl -s -H 'x-api-key: count' "${urls[@]}" >/dev/null
  if [[ -n "$SERVICE_PORT" ]]; then
    # Every request was decided at the proxy's share, none by a failure mode (a VM's
    # start-up heartbeat can fail under valgrind; the others' answers hold the shares).
    local stats=""
    for _ in $(seq 60); do
      stats="$(curl -s "http://127.0.0.1:$admin/stats/prometheus" || true)"
      grep -qE "^meshlimit_allowed_total(\{\})? $2\$" <<<"$stats" && break
      sleep 1
    done
    if ! grep -qE "^meshlimit_allowed_total(\{\})? $2\$" <<<"$stats" \
      || grep -qE '^meshlimit_failure_mode_[a-z]+_total(\{\})? [1-9]' <<<"$stats"; then
      echo "error: not every request was decided in global scope at its share:" >&2
      grep -E '^meshlimit_(allowed|failure_mode|sync)' <<<"$stats" >&2 || true
      kill -TERM "$pid"
      exit 1
    fi
  fi
  kill -TERM "$pid"
  wait "$pid" || true
  local total=0
  for f in "$out".*; do
    local n
    n="$(grep -m1 '^summary:' "$f" | awk '{print $2}')"
    total=$((total + ${n:-0}))
  done
  rm -f "$out".*
  echo "$total"
}

for c in "${cases[@]}"; do
  a="$(count "$c" "$N1")"
  b="$(count "$c" "$N2")"
  echo "$c ($SCOPE scope): $(( (b - a) / (N2 - N1) )) instructions per request ($N1 -> $N2)"
done
