#!/usr/bin/env bash
# Quick demo of the HSNN core: installs what is missing, then trains, indexes and serves
# on the planted problem and prints cost and recall of layer-wise retrieval.
set -euo pipefail
cd "$(dirname "$0")/.."
HSNN_SKIP_SERVERS=1 bash scripts/setup.sh
exec .venv/bin/python -m hsnn.demo "$@"
