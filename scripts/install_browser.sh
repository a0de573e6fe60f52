#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the status-page browser test
# (tests/integration/test_status_page.py), idempotently: nothing happens when a chromium binary is on PATH.
# Packages: chromium (pulls chromium-common and its libraries) and fonts-dejavu-core (so text renders).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi

echo "==> installing Debian's chromium (headless browser for the status page test)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version >&2
