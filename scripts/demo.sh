#!/usr/bin/env bash
# Install spawnd, start a daemon on a private socket, and spawn through it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test >/dev/null
dir=$(mktemp -d)
export SPAWND_SOCKET="$dir/spawnd.sock" SPAWND_AUTOSTART=0
python3 -m spawnd serve --socket "$SPAWND_SOCKET" --log-level info &
daemon=$!
trap 'kill -TERM $daemon; wait $daemon; rm -rf "$dir"' EXIT
for _ in $(seq 100); do python3 -m spawnd ping >/dev/null 2>&1 && break; sleep 0.05; done
python3 -m spawnd ping
echo "--- spawnd run -- sh -c 'echo hello from pid \$\$; exit 3'"
python3 -m spawnd run -- sh -c 'echo hello from pid $$; exit 3' || echo "exit status: $?"
echo "--- python: spawnd_client.run from a 16-thread program"
python3 examples/threads_demo.py
