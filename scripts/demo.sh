#!/usr/bin/env bash
# Install spawnd into the project's venv (.venv), start a daemon on a private socket, and
# spawn through it. Needs only a python3 >= 3.11 (no root, no system tools).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(./scripts/setup.sh | tail -n1)
bin=$(dirname "$py")
dir=$(mktemp -d)
export SPAWND_SOCKET="$dir/spawnd.sock" SPAWND_AUTOSTART=0
"$bin/spawnd" serve --socket "$SPAWND_SOCKET" --log-level info &
daemon=$!
trap 'kill -TERM $daemon; wait $daemon; rm -rf "$dir"' EXIT
for _ in $(seq 200); do "$bin/spawnd" ping >/dev/null 2>&1 && break; sleep 0.05; done
"$bin/spawnd" ping
echo "--- spawnd run -- sh -c 'echo hello from pid \$\$; exit 3'"
"$bin/spawnd" run -- sh -c 'echo hello from pid $$; exit 3' || echo "exit status: $?"
echo "--- python: spawnd_client.run from a 16-thread program"
"$py" examples/threads_demo.py
