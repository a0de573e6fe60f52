#!/usr/bin/env bash
# The project's test command: install what is missing, lint, then run the whole suite
# (integration tests start a real Kafka broker and Redis server as local processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HSNN_REQUIRE_SERVERS="${HSNN_REQUIRE_SERVERS:-1}"
echo "==> ruff" >&2
.venv/bin/ruff check .
echo "==> pytest" >&2
.venv/bin/python -m pytest "$@"
