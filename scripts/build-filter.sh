#!/usr/bin/env bash
# Builds the filter: target/meshlimit.wasm (what envoy/, the tests, the demo and the
# benchmark load). Prints its path.
#
# Two steps: cargo builds the cdylib for wasm32-wasip1, then tools/wasm-trim drops the
# ABI callbacks the filter does not implement. The proxy-wasm SDK exports all of them
# and Envoy calls into the VM for every exported one (request/response body and
# trailers, on_log, on_done, ...) on every request; Envoy skips the ones a module does
# not export. See README, "Host calls per request".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1 >&2
cargo build --profile wasm --target wasm32-wasip1 -p meshlimit-filter >&2
# wasm-trim in the dev profile: it copies one module in milliseconds either way, and its
# wasmparser builds in 24 s instead of 38 s (cold, measured here).
cargo build -p wasm-trim >&2
UNUSED=(
  proxy_on_log proxy_on_done proxy_on_queue_ready
  proxy_on_request_body proxy_on_request_trailers
  proxy_on_response_body proxy_on_response_trailers
  proxy_on_new_connection proxy_on_downstream_data proxy_on_downstream_connection_close
  proxy_on_upstream_data proxy_on_upstream_connection_close
  proxy_on_grpc_receive_initial_metadata proxy_on_grpc_receive
  proxy_on_grpc_receive_trailing_metadata proxy_on_grpc_close proxy_on_foreign_function
)
target/debug/wasm-trim target/wasm32-wasip1/wasm/meshlimit_filter.wasm target/meshlimit.wasm "${UNUSED[@]}"
echo "$ROOT/target/meshlimit.wasm"
