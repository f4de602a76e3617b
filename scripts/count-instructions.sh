#!/usr/bin/env bash
# Instructions per request of Envoy with the meshlimit filter, counted with callgrind:
# stable where wall-clock figures swing by ±30% on shared machines.
#
#   scripts/count-instructions.sh                       the current build (target/meshlimit.wasm)
#   scripts/count-instructions.sh none a.wasm b.wasm    no filter, then each module given
#
# For each case: Envoy (--concurrency 1, a direct_response route) runs under
# `valgrind --tool=callgrind`, once for N1 and once for N2 requests sent on one
# keep-alive connection with a fixed x-api-key, against one rule matching every path
# with a limit that never refuses and `x-ratelimit` headers. The summaries of all
# threads are added up; (I(N2) - I(N1)) / (N2 - N1) is the cost of one request, with
# start-up and V8's background compilation of the first requests cancelled out.
# A case takes 1-4 minutes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N1="${N1:-3000}"
N2="${N2:-5000}"
RULES='{"rules":[{"id":"all","match":{"path":"*"},"key":["header:x-api-key"],"limits":[{"window":"1s","max":1000000000}]}],"headers":"x-ratelimit"}'
RUN_DIR="$ROOT/.run/count"
mkdir -p "$RUN_DIR"
ENVOY="$(scripts/install-envoy.sh)"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }

cases=("$@")
if [[ ${#cases[@]} -eq 0 ]]; then
  cases=("$(scripts/build-filter.sh)")
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

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
                        code: { local: { filename: $1 } }
EOF
)
  fi
  cat <<EOF
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
  # One curl process, one keep-alive connection, $2 requests.
  local urls=()
  for _ in $(seq "$2"); do urls+=("http://127.0.0.1:$port/x"); done
  curl -s -H 'x-api-key: count' "${urls[@]}" >/dev/null
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
  echo "$c: $(( (b - a) / (N2 - N1) )) instructions per request ($N1 -> $N2)"
done
