#!/usr/bin/env bash
# Benchmark of meshlimit-service against the in-memory store, one Redis node and a
# 3-master Redis Cluster, all on loopback. Starts and stops everything it needs.
#
#   redis-service/bench.sh [seconds]          (default 10 s per run)
#
# Env: CHECK_CONC (default 4), SYNC_CONC (default 4), SYNC_BATCH (default 1000),
#      MIXED_RATES (default "1 5 10": reports per second of MIXED_BATCH entries, default
#      10 000, sent while checks run; one run per rate, against each Redis store),
#      ONLY ("memory", "redis", "cluster": run that store only),
#      SERVICE_BIN (the service binary to measure, default the one this builds: set it to
#      another build to compare two in one interleaved series of runs).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
CHECK_CONC="${CHECK_CONC:-4}"
SYNC_CONC="${SYNC_CONC:-4}"
SYNC_BATCH="${SYNC_BATCH:-1000}"
MIXED_RATES="${MIXED_RATES:-1 5 10}"
MIXED_BATCH="${MIXED_BATCH:-10000}"
ONLY="${ONLY:-}"
scripts/install-redis.sh >/dev/null
cargo build --release -p meshlimit-service --bins >/dev/null 2>&1 || cargo build --release -p meshlimit-service --bins
BIN="${SERVICE_BIN:-target/release/meshlimit-service}"
BENCH=target/release/meshlimit-bench
WORK="$(mktemp -d /tmp/meshlimit-bench.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Below 55535: a cluster node also listens on port + 10000.
free_port() { python3 -c '
import socket
while True:
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close()
    if p < 55000: print(p); break'; }

echo bench-token > "$WORK/token"
cat > "$WORK/rules.json" <<'JSON'
{"rules":[{"id":"bench","match":{"path":"*"},"limits":[{"window":"1s","max":1000000},{"window":"1h","max":1000000000}]}]}
JSON

start_redis() { # port [cluster]
  local port=$1; mkdir -p "$WORK/r$port"
  local extra=()
  if [ "${2:-}" = cluster ]; then
    extra=(--cluster-enabled yes --cluster-config-file "$WORK/r$port/nodes.conf" --cluster-node-timeout 2000)
  fi
  redis-server --port "$port" --bind 127.0.0.1 --dir "$WORK/r$port" --save "" --appendonly no \
    "${extra[@]}" >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.05; done
  echo "redis on $port did not start" >&2; exit 1
}

start_service() { # extra args...
  local port; port=$(free_port)
  "$BIN" --listen "127.0.0.1:$port" --token-file "$WORK/token" --rules "$WORK/rules.json" \
    "$@" >/dev/null 2>"$WORK/svc-$port.log" &
  PIDS+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.05; done
  SVC_URL="http://127.0.0.1:$port"
}

run() { # label
  local label=$1
  echo "== $label"
  "$BENCH" --url "$SVC_URL" --token bench-token --mode check --seconds "$SECS" --concurrency "$CHECK_CONC" --clients 100000
  "$BENCH" --url "$SVC_URL" --token bench-token --mode sync --seconds "$SECS" --concurrency "$SYNC_CONC" --batch "$SYNC_BATCH" --clients 1000000
}

mixed() { # checks while large reports run, one line per report rate (service defaults)
  start_service "$@"
  for rate in $MIXED_RATES; do
    "$BENCH" --url "$SVC_URL" --token bench-token --mode mixed --seconds "$SECS" --concurrency "$CHECK_CONC" \
      --clients 1000000 --batch "$MIXED_BATCH" --report-rate "$rate"
  done
}

if [ -z "$ONLY" ] || [ "$ONLY" = memory ]; then
  start_service --max-reports-in-flight "$SYNC_CONC"
  run "in-memory store"
fi

if [ -z "$ONLY" ] || [ "$ONLY" = redis ]; then
  P1=$(free_port); start_redis "$P1"
  start_service --redis-url "redis://127.0.0.1:$P1" --max-reports-in-flight "$SYNC_CONC"
  run "one Redis node"
  mixed --redis-url "redis://127.0.0.1:$P1"
  echo "   Redis used_memory: $(redis-cli -p "$P1" info memory | grep '^used_memory_human' | tr -d '\r'), keys: $(redis-cli -p "$P1" dbsize)"
  echo "   Redis $(redis-cli -p "$P1" info commandstats | grep -E '^cmdstat_evalsha' | tr -d '\r')"
fi
[ -n "$ONLY" ] && [ "$ONLY" != cluster ] && exit 0

C=(); for _ in 1 2 3; do p=$(free_port); start_redis "$p" cluster; C+=("$p"); done
redis-cli --cluster create "127.0.0.1:${C[0]}" "127.0.0.1:${C[1]}" "127.0.0.1:${C[2]}" --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 100); do redis-cli -p "${C[0]}" cluster info | grep -q cluster_state:ok && break; sleep 0.1; done
SEEDS="redis://127.0.0.1:${C[0]},redis://127.0.0.1:${C[1]},redis://127.0.0.1:${C[2]}"
start_service --redis-cluster "$SEEDS" --max-reports-in-flight "$SYNC_CONC"
run "Redis Cluster, 3 masters"
mixed --redis-cluster "$SEEDS"
