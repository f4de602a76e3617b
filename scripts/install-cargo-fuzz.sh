#!/usr/bin/env bash
# Installs what scripts/fuzz.sh needs: a nightly toolchain (libFuzzer's sanitizer
# coverage flags are nightly-only) and cargo-fuzz. Idempotent.
set -euo pipefail
# RUSTUP_AUTO_INSTALL=0 on the project machines, so install nightly explicitly.
if ! rustup toolchain list | grep -q '^nightly-'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
