#!/usr/bin/env bash
# Set up everything the suite needs (system tools, the package, test extras), then run it all.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
ruff check spawnd client tests bench examples
exec python3 -m pytest -q "$@"
