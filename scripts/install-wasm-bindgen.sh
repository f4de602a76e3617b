#!/usr/bin/env bash
# Installs wasm-bindgen-cli (the runner for the core's wasm-bindgen-test tests) into
# .tools/wasm-bindgen, at exactly the wasm-bindgen version Cargo.lock pins (the runner
# refuses test binaries built by another version). Idempotent. Prints the runner path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' "$ROOT/Cargo.lock")"
[[ -n "$version" ]] || { echo "wasm-bindgen is not in Cargo.lock" >&2; exit 1; }
dest="$ROOT/.tools/wasm-bindgen"
runner="$dest/bin/wasm-bindgen-test-runner"
if [[ ! -x "$runner" ]] || [[ "$("$dest/bin/wasm-bindgen" --version 2>/dev/null)" != "wasm-bindgen $version" ]]; then
  # Not --locked: the published lock file of the CLI names crate versions that the
  # registry mirror here may not have; the CLI version itself is pinned.
  cargo install wasm-bindgen-cli --version "$version" --root "$dest" --force >&2
fi
command -v node >/dev/null || { echo "node is required to run wasm tests" >&2; exit 1; }
echo "$runner"
