#!/usr/bin/env bash
# Install the tools the deployment tests (tests/test_deploy.py) need, idempotently:
#   - promtool + prometheus from Debian's "prometheus" package (the service it may start is stopped
#     and disabled: we only want the binaries);
#   - Python packages into ./.venv: kubernetes-validate, jsonschema, PyYAML, and check-jsonschema
#     (it ships the official compose-spec JSON schema, so nothing is vendored here).
# kubectl (for `kubectl kustomize`) is optional: the tests use it when it is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi

if ! command -v promtool >/dev/null 2>&1; then
  echo "==> installing Debian's prometheus package (promtool)" >&2
  # Keep the package's service from starting during the install (no init system is needed here).
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ "$created_policy" = "1" ]; then
    $SUDO rm -f "$policy"
  fi
fi

# If the package's service is running anyway (a host with systemd), stop and disable it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  if systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl stop prometheus || true
  fi
  if systemctl is-enabled --quiet prometheus 2>/dev/null; then
    $SUDO systemctl disable prometheus >/dev/null 2>&1 || true
  fi
elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
  $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
if command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/prometheus ]; then
  $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
missing=()
.venv/bin/python -c "import kubernetes_validate" 2>/dev/null || missing+=("kubernetes-validate")
.venv/bin/python -c "import jsonschema" 2>/dev/null || missing+=("jsonschema")
.venv/bin/python -c "import yaml" 2>/dev/null || missing+=("PyYAML")
.venv/bin/python -c "import check_jsonschema" 2>/dev/null || missing+=("check-jsonschema")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing into .venv: ${missing[*]}" >&2
  .venv/bin/python -m pip install --quiet "${missing[@]}"
fi

echo "==> ops tools:" >&2
promtool --version 2>&1 | head -n 1 >&2
.venv/bin/kubernetes-validate --version >&2
