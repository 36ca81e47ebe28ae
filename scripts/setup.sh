#!/usr/bin/env bash
# One-time set-up shared by the demo and the test command: system tools, then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v strace >/dev/null || need+=(strace)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v setpriv >/dev/null || need+=(util-linux)
command -v prlimit >/dev/null || need+=(util-linux)
command -v cc >/dev/null || need+=(gcc)
[ -x /usr/bin/python3 ] || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q -e ".[${1:-test}]"
