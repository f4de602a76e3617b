#!/usr/bin/env bash
# meshlimit demo: the filter in a real Envoy in front of a small upstream.
#
#   scripts/demo.sh           build, start, print how to try it, run until Ctrl-C
#   scripts/demo.sh --check   build, start, send requests, show the 429s, stop
#
# Listener 127.0.0.1:10000, Envoy admin 127.0.0.1:9901, upstream 127.0.0.1:10080, the
# companion service (in-memory store) on 127.0.0.1:8080, which the filter syncs its
# global rule with (see envoy/envoy.yaml). Logs go to .run/demo/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CHECK=0
case "${1:-}" in
  --check) CHECK=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

LISTEN_PORT=10000
ADMIN_PORT=9901
UPSTREAM_PORT=10080
RUN_DIR="$ROOT/.run/demo"

if [[ -t 1 ]]; then
  say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
  say() { printf '\n== %s\n' "$*"; }
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

say "building the filter (target/meshlimit.wasm)"
scripts/build-filter.sh

say "building the demo upstream and the companion service"
cargo build --release -p meshlimit-e2e --bin demo-upstream
cargo build --release -p meshlimit-service --bin meshlimit-service

say "installing Envoy (if needed)"
ENVOY="$(scripts/install-envoy.sh)"
"$ENVOY" --version

SERVICE_PORT=8080
ports=("$LISTEN_PORT" "$ADMIN_PORT" "$UPSTREAM_PORT" "$SERVICE_PORT")
for port in "${ports[@]}"; do
  if port_in_use "$port"; then
    echo "error: 127.0.0.1:$port is already in use (another demo running?)" >&2
    exit 1
  fi
done

mkdir -p "$RUN_DIR"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "starting demo-upstream (:$UPSTREAM_PORT), the companion (:$SERVICE_PORT) and Envoy (:$LISTEN_PORT)"
target/release/demo-upstream --port "$UPSTREAM_PORT" >"$RUN_DIR/upstream.log" 2>&1 &
PIDS+=($!)
# In-memory store, with a bearer token made for this run: the filter reads it from
# Envoy's environment (ML_TOKEN, envoy/envoy.yaml host_env_keys), the companion from a
# file only this user can read.
ML_TOKEN="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export ML_TOKEN
(umask 077 && printf '%s\n' "$ML_TOKEN" >"$RUN_DIR/token")
target/release/meshlimit-service --listen "127.0.0.1:$SERVICE_PORT" \
  --token-file "$RUN_DIR/token" >"$RUN_DIR/service.log" 2>&1 &
PIDS+=($!)
# They run as children of this script, which waits for them: Envoy stops when the demo
# stops, and is never left running in the background of an interactive shell.
"$ENVOY" -c envoy/envoy.yaml --concurrency 2 --disable-hot-restart \
  >"$RUN_DIR/envoy.log" 2>&1 &
ENVOY_PID=$!
PIDS+=("$ENVOY_PID")

ready=0
for _ in $(seq 300); do
  if ! kill -0 "$ENVOY_PID" 2>/dev/null; then
    echo "error: Envoy exited during start-up; last lines of $RUN_DIR/envoy.log:" >&2
    tail -n 20 "$RUN_DIR/envoy.log" >&2
    exit 1
  fi
  if [[ "$(curl -s "http://127.0.0.1:$ADMIN_PORT/ready" || true)" == LIVE* ]] \
    && port_in_use "$UPSTREAM_PORT" \
    && port_in_use "$SERVICE_PORT"; then
    ready=1
    break
  fi
  sleep 0.1
done
if [[ $ready != 1 ]]; then
  echo "error: Envoy not ready after 30 s; see $RUN_DIR/envoy.log" >&2
  exit 1
fi
grep -F 'wasm log' "$RUN_DIR/envoy.log" | sed 's/^.*wasm log /  filter: /' | sort -u || true

if [[ $CHECK == 1 ]]; then
  say "POST /api/auth/login x 7, each with a fresh x-api-key (limit: 5 per minute per client address)"
  codes=()
  for i in $(seq 7); do
    # The login rule counts per address: rotating the key does not help.
    headers="$(curl -s -o /dev/null -D - -X POST -H "x-api-key: demo-$i" \
      "http://127.0.0.1:$LISTEN_PORT/api/auth/login" | tr -d '\r')"
    code="$(head -n1 <<<"$headers" | awk '{print $2}')"
    codes+=("$code")
    printf '%s  %s\n' "$i" "$(head -n1 <<<"$headers")"
    grep -iE '^(x-ratelimit-|ratelimit|retry-after)' <<<"$headers" | sed 's/^/     /'
  done

  say "GET /api/items x 25 at once with x-api-key: other (10/s, burst 20)"
  burst="$(seq 25 | xargs -P 25 -I{} curl -s -o /dev/null -w '%{http_code}\n' \
    -H 'x-api-key: other' "http://127.0.0.1:$LISTEN_PORT/api/items" | sort | uniq -c)"
  echo "$burst"

  say "metrics (admin /stats/prometheus)"
  # The filter flushes its counters to Envoy on a timer: wait for the first flush.
  for _ in $(seq 50); do
    metrics="$(curl -s "http://127.0.0.1:$ADMIN_PORT/stats/prometheus" | grep '^meshlimit_' || true)"
    grep -qE '^meshlimit_allowed_total(\{\})? [1-9]' <<<"$metrics" && break
    sleep 0.1
  done
  echo "$metrics"
  echo "upstream served: $(curl -s "http://127.0.0.1:$UPSTREAM_PORT/__hits") requests"

  say "the companion (in-memory store): a proxy's usage report to POST /v1/sync"
  sync='{"proxy_id":"demo-envoy","zone":"az1","interval_ms":1000,"entries":[{"rule":"api","key":"00000000000000aa","limits":[{"window_secs":60,"max":100,"burst":100}],"admitted":5,"span_ms":1000}]}'
  echo "  > $sync"
  answer="$(curl -s -X POST -H 'content-type: application/json' \
    -H "authorization: Bearer $ML_TOKEN" -d "$sync" \
    "http://127.0.0.1:$SERVICE_PORT/v1/sync")"
  echo "  < $answer"
  if [[ "$answer" != *'"shares"'* ]]; then
    say "check failed: the companion did not answer the sync"
    exit 1
  fi

  if [[ " ${codes[*]} " == *" 429 "* && "${codes[0]}" == 200 ]]; then
    say "check passed: 200 first, then 429 once over the limit"
    exit 0
  fi
  say "check FAILED: status codes ${codes[*]}"
  exit 1
fi

cat <<EOF

Envoy with meshlimit is listening on http://127.0.0.1:$LISTEN_PORT (admin :$ADMIN_PORT).
Logs: $RUN_DIR/envoy.log, $RUN_DIR/upstream.log, $RUN_DIR/service.log
Companion service (in-memory store): http://127.0.0.1:$SERVICE_PORT, bearer token in $RUN_DIR/token

Try it (another terminal):

  # login is limited to 5 per minute per client address (a fresh key each time does not
  # help): the 6th answer is 429
  for i in \$(seq 12); do curl -s -o /dev/null -w '%{http_code}\n' \\
    -H "x-api-key: key-\$i" localhost:$LISTEN_PORT/api/auth/login -X POST; done

  # the rate-limit headers and the 429 body
  curl -i -X POST -H 'x-api-key: demo' localhost:$LISTEN_PORT/api/auth/login

  # the API rule counts per x-api-key: another key has its own budget
  curl -i -H 'x-api-key: someone-else' localhost:$LISTEN_PORT/api/items

  # metrics
  curl -s localhost:$ADMIN_PORT/stats/prometheus | grep ^meshlimit_

  # the companion: a proxy's usage report and the share it gets back
  curl -s -X POST localhost:$SERVICE_PORT/v1/sync -H 'content-type: application/json' \\
    -H "authorization: Bearer \$(cat $RUN_DIR/token)" \\
    -d '{"proxy_id":"envoy-a","interval_ms":1000,"entries":[{"rule":"api","key":"00000000000000aa","limits":[{"window_secs":60,"max":100,"burst":100}],"admitted":5,"span_ms":1000}]}'

Ctrl-C stops everything.
EOF
wait "$ENVOY_PID"
