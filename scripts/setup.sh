#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment and install spawnd into it.
#
#   scripts/setup.sh [--python X.Y|PATH] [--tools] [EXTRAS]
#
# EXTRAS: pip extras to install (default: none; "test" for the suite, "test,bench").
# --tools: also install the system tools the TEST SUITE needs (strace, systemd-socket-activate,
#          setpriv/prlimit, gcc, tmux, /usr/bin/python3) with apt; needs root or sudo.
#          The demo does not need them and never asks for root for them.
# Prints the venv's python as the last line of stdout. Works with a distribution Python
# that refuses `pip install` outside a venv (PEP 668, "externally managed").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh

py="" tools=0 extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py="$2"; shift 2 ;;
    --tools) tools=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "setup.sh: unknown option $1" >&2; exit 2 ;;
    *) extras="$1"; shift ;;
  esac
done

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "setup.sh: need root or sudo to run: $*" >&2; return 1; fi
}
apt_install() {
  echo "setup.sh: installing with apt: $*" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ "$tools" = 1 ]; then
  need=()
  command -v strace >/dev/null || need+=(strace)
  command -v systemd-socket-activate >/dev/null || need+=(systemd)
  command -v setpriv >/dev/null || need+=(util-linux)
  command -v prlimit >/dev/null || need+=(util-linux)
  command -v script >/dev/null || need+=(bsdutils)
  command -v cc >/dev/null || need+=(gcc)
  command -v tmux >/dev/null || need+=(tmux)
  command -v useradd >/dev/null || need+=(passwd)
  [ -x /usr/bin/python3 ] || need+=(python3)  # the interpreter the tests' other users run
  if [ ${#need[@]} -gt 0 ]; then apt_install "${need[@]}"; fi
fi

case "$py" in
  "") py=$(find_python) || { echo "setup.sh: no python3 >= 3.$MIN_MINOR found on PATH (or in pyenv)" >&2; exit 1; } ;;
  */*) ;;
  *) want="$py"; py=$(find_python "$want") || { echo "setup.sh: no Python $want found (looked for python$want on PATH, in pyenv, in /usr/bin)" >&2; exit 1; } ;;
esac
py_minor "$py" >/dev/null || { echo "setup.sh: $py is not Python >= 3.$MIN_MINOR" >&2; exit 1; }
venv=$(venv_dir "$py")
vpy="$venv/bin/python"

# 1. The venv. Debian/Ubuntu split ensurepip out (package python3-venv / python3.X-venv):
#    without it, make the venv without pip and drive it with the system's pip if there is
#    one (pip >= 22.3 --python), else install python3-venv when root/sudo is at hand.
pip=("$vpy" -m pip)
if [ ! -x "$vpy" ] || ! "$vpy" -c 'import sys' 2>/dev/null; then
  rm -rf "$venv"
  if "$py" -c 'import ensurepip' 2>/dev/null && "$py" -m venv "$venv" 2>/dev/null; then
    :
  else
    rm -rf "$venv"
    if ! "$py" -m pip --version >/dev/null 2>&1; then
      minor=$(py_minor "$py")
      if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; then
        apt_install "python$minor-venv" || apt_install python3-venv
      else
        echo "setup.sh: $py cannot make a virtual environment with pip (no ensurepip, no pip)." >&2
        echo "setup.sh: install python3-venv (Debian/Ubuntu: apt-get install python3-venv) or use another python3 >= 3.$MIN_MINOR: scripts/setup.sh --python /path/to/python3" >&2
        exit 1
      fi
      "$py" -m venv "$venv"
    else
      "$py" -m venv --without-pip "$venv"
    fi
  fi
fi
"$vpy" -m pip --version >/dev/null 2>&1 || pip=("$py" -m pip --python "$vpy")

# 2. The package, editable (its build step, e.g. compiling the C exec helper, runs here),
#    redone only when the build inputs or the extras change.
stamp="$venv/.spawnd-installed"
key=$( { echo "extras=$extras"; cat pyproject.toml setup.py setup.cfg 2>/dev/null;
         git ls-files -z -- '*.c' '*.h' 2>/dev/null | xargs -0r cat; } | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
  log=$(mktemp)
  if ! "${pip[@]}" install -q -e ".${extras:+[$extras]}" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"
    echo "setup.sh: pip install into $venv failed (output above)" >&2; exit 1
  fi
  rm -f "$log"
  echo "$key" > "$stamp"
fi
echo "$vpy"
