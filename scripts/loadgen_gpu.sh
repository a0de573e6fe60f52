#!/usr/bin/env bash
# The retrieval API load generator on a GPU machine: the service scores on CUDA (HSNN_API_DEVICE=cuda, the
# index built on the CPU and moved beside the model), with the paper's preset models at 10^4-10^7 ads.
# Never run by CI; without a GPU it says so and exits 0 (the CPU run is `python -m bench.loadgen`).
# Extra arguments go to the loadgen, e.g. `scripts/loadgen_gpu.sh --ads 1000000 --duration 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to torch: nothing to run (see docs/api.md, 'Load generator')" >&2
    exit 0
fi
"$PYTHON" -m pytest -q tests/hsnn/test_serving.py -k cuda  # the CUDA path equals the CPU one first
exec "$PYTHON" -m bench.loadgen --device cuda --threads 4 --model paper --ads 10000 1000000 10000000 \
    --concurrency 1 32 128 --max-batch 128 --duration 10 --out reports/gpu "$@"
