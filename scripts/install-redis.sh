#!/usr/bin/env bash
# Installs redis-server and redis-cli (Debian/Ubuntu apt) when they are missing.
# The companion service's tests start their own Redis instances; they need the binaries only.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
$SUDO apt-get install -y redis-server redis-tools
# The package may start a system instance on 6379; the tests do not use it.
