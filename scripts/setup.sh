#!/usr/bin/env bash
# Install everything the project needs into ./.venv (idempotent): Python deps, torch from PyPI,
# and the real Kafka broker + Redis server that the integration tests start.
# HSNN_EXTRAS picks the pyproject extras (default "dev": everything the tests need; the demo asks for
# "serve"); HSNN_TEST_TOOLS=0 skips promtool/prometheus and Chromium, which only tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${HSNN_EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
echo "==> installing Python packages (torch from PyPI is large the first time)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
if [ "${HSNN_SKIP_SERVERS:-0}" != "1" ]; then
  echo "==> installing Kafka (Maven Central) and Redis (Debian)" >&2
  bash devservers/install.sh
fi
if [ "${HSNN_SKIP_SERVERS:-0}" != "1" ] && [ "${HSNN_TEST_TOOLS:-1}" != "0" ]; then
  echo "==> installing ops tools (promtool from Debian's prometheus)" >&2
  bash scripts/install_ops_tools.sh
  echo "==> installing Chromium (status page browser test)" >&2
  bash scripts/install_browser.sh
fi
