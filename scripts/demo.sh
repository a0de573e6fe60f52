#!/usr/bin/env bash
# The one-command demo of the whole system: installs what is missing (Python packages, Kafka, Redis), then
# runs `python -m demo`: real Kafka + Redis, the trainer, indexer and retrieval API as processes, simulated
# traffic, and live progress until Ctrl-C (options: --duration S, --rate R, --ads N, --port P; see --help).
# The quick core-only demo (train, index and serve the planted problem in one process, no services) is
# `.venv/bin/python -m demo.model_only`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only what the demo runs: the [serve] extra, Kafka and Redis (no test tools: no promtool, no Chromium).
HSNN_EXTRAS=serve HSNN_TEST_TOOLS=0 bash scripts/setup.sh
exec .venv/bin/python -m demo "$@"
