#!/usr/bin/env bash
# Set up and run the whole suite: ruff once, then pytest on every Python >= 3.11 this machine
# has (3.11, 3.12, 3.13, ... found on PATH, in pyenv or /usr/bin), each in its own venv.
#
#   scripts/test.sh [--python X.Y]... [PYTEST ARGS]
#
#   --python X.Y  run on this version only (repeat for several); default: every version found
#   PYTEST ARGS   passed to each pytest run, e.g. -m soak, -k status, tests/test_cli.py
#
# Needs root or sudo the first time, for the suite's system tools (apt: strace, systemd,
# util-linux, gcc, tmux); see scripts/setup.sh. Exit status: 0 if every version passed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh

versions=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) versions+=("$2"); shift 2 ;;
    --python=*) versions+=("${1#--python=}"); shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ ${#versions[@]} -eq 0 ]; then
  mapfile -t versions < <(available_versions)
  [ ${#versions[@]} -gt 0 ] || { echo "test.sh: no python3 >= 3.$MIN_MINOR found" >&2; exit 1; }
fi

start=$(date +%s)
declare -A vpy
tools=--tools
for v in "${versions[@]}"; do
  vpy[$v]=$(./scripts/setup.sh --python "$v" $tools test | tail -n1)
  tools=""  # once is enough
done
echo "test.sh: set-up took $(( $(date +%s) - start )) s for Python ${versions[*]}"

"${vpy[${versions[0]}]}" -m ruff check spawnd client tests bench examples

logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT
status=0
summary=()
for v in "${versions[@]}"; do
  echo "=== pytest on Python $v (${vpy[$v]})"
  t0=$(date +%s)
  set +e
  "${vpy[$v]}" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$logdir/$v.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" = 5 ] && [ $# -gt 0 ]; then
    # pytest's "no tests collected": fine for a selection (e.g. -m soak where none apply),
    # a failure for a full run (the suite must never be empty).
    echo "test.sh: Python $v: no tests selected by: $*"
    rc=0
  fi
  [ "$rc" = 0 ] || status=1
  summary+=("python $v: exit $rc in $(( $(date +%s) - t0 )) s")
done
echo "=== summary (total $(( $(date +%s) - start )) s)"
printf '  %s\n' "${summary[@]}"
# One closing line with the totals of every run, in pytest's words.
"${vpy[${versions[0]}]}" - "$logdir"/*.log <<'PY'
import re, sys
tot = {}
for name in sys.argv[1:]:
    lines = [l for l in open(name, errors="replace") if re.search(r"\d+ (passed|failed|error)", l)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", lines[-1] if lines else ""):
        what = "error" if what.startswith("error") else what
        tot[what] = tot.get(what, 0) + int(n)
order = ["passed", "failed", "skipped", "error", "xfailed", "xpassed", "deselected"]
print(", ".join(f"{tot.get(k, 0)} {k}" for k in order if k in ("passed", "failed") or tot.get(k)))
PY
exit $status
