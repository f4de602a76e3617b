#!/usr/bin/env bash
# The whole test suite: installs what it needs, runs the gates (format and lints, as the
# proxy-wasm Rust SDK's CI does), builds the filter, runs the unit tests and a short
# fuzzing pass, then the end-to-end tests against a real Envoy. `.ci/run` runs this.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SECONDS=0
section() { printf '\n==== %s  (t=%ss)\n' "$*" "$SECONDS"; }

# e2e/tests/three_az.rs builds network namespaces, veths and a bridge: root only. Refuse
# to run without it (at once, not after the unit tests) rather than let the suite pass
# without those tests.
if [[ "$(id -u)" -ne 0 ]]; then
  echo "scripts/test.sh: must run as root: the e2e tests create network namespaces (e2e/tests/three_az.rs); CI runs as root" >&2
  exit 1
fi
command -v ip >/dev/null 2>&1 || { apt-get update && apt-get install -y iproute2; }

section "toolchain: wasm targets, clippy, rustfmt"
# RUSTUP_AUTO_INSTALL=0 on the project machines: rust-toolchain.toml alone installs nothing.
rustup target add wasm32-wasip1 wasm32-unknown-unknown
rustup component add clippy rustfmt
cargo --version

# The tools that later steps need and that build from source (the wasm test runner,
# nightly + cargo-fuzz) install in the background while the gates and builds run: they
# are mostly download and compile, and the steps before the tests leave a core idle at
# times. Waited for (and their log shown on failure) before the first test runs.
mkdir -p .run
scripts/install-wasm-bindgen.sh >.run/install-wasm-bindgen.log 2>&1 &
WASM_BINDGEN_PID=$!
scripts/install-cargo-fuzz.sh >.run/install-cargo-fuzz.log 2>&1 &
CARGO_FUZZ_PID=$!
await_install() { # pid log
  if ! wait "$1"; then
    echo "installing failed, its log ($2):" >&2
    cat "$2" >&2
    exit 1
  fi
}

# The gates first: they are the cheapest to fail. The lints the project holds itself to
# are the [workspace.lints] table of Cargo.toml; -D warnings makes every warning, of
# rustc and clippy, an error. The filter is also linted for the target it ships on, and
# the core for the one its tests run on in wasm: code behind cfg(target_arch = "wasm32")
# is only seen there.
section "gate: cargo fmt --all -- --check"
cargo fmt --all -- --check

section "gate: cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

section "gate: clippy for the filter on wasm32-wasip1, the core on wasm32-unknown-unknown"
cargo clippy -p meshlimit-filter --target wasm32-wasip1 --all-targets -- -D warnings
cargo clippy -p meshlimit-core --target wasm32-unknown-unknown --all-targets -- -D warnings

section "Envoy"
ENVOY_BIN="$(scripts/install-envoy.sh)"
export ENVOY_BIN
"$ENVOY_BIN" --version

if [[ -f scripts/install-redis.sh ]]; then
  section "Redis"
  bash scripts/install-redis.sh
fi

section "build: filter wasm (release, trimmed: target/meshlimit.wasm)"
ls -l "$(scripts/build-filter.sh)"

section "waiting for the background installs (wasm-bindgen, nightly + cargo-fuzz)"
await_install "$WASM_BINDGEN_PID" .run/install-wasm-bindgen.log
await_install "$CARGO_FUZZ_PID" .run/install-cargo-fuzz.log

section "unit tests"
cargo test --workspace --exclude meshlimit-e2e

section "fuzzing: a short pass of every target (scripts/fuzz.sh ${FUZZ_SECONDS:-10})"
# Replays every seed and kept crash input (fuzz/corpus/), then fuzzes each target for
# FUZZ_SECONDS. README, "Fuzzing"; the long runs are `scripts/fuzz.sh 300`.
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"

section "core unit tests inside wasm (wasm32-unknown-unknown under Node)"
# The same tests as above, compiled to wasm and run by wasm-bindgen-test: the core
# behaves the same inside wasm as natively.
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER="$(scripts/install-wasm-bindgen.sh)" \
  cargo test -p meshlimit-core --target wasm32-unknown-unknown

section "demo, unattended (README's first command: scripts/demo.sh --check)"
scripts/demo.sh --check

section "e2e tests (real Envoy; three AZs in network namespaces)"
# The three-AZ topology runs the real companion binary from target/release/.
cargo build --release -p meshlimit-service --bin meshlimit-service
cargo test -p meshlimit-e2e --release -- --test-threads=1

section "all tests passed"
