"""Layers stay one way: the model package `hsnn` pulls in no serving stack; no service reads a simulated world."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import hsnn

ROOT = Path(__file__).resolve().parent.parent
SERVING_STACK = ("kafka", "redis", "fastapi", "starlette", "uvicorn", "prometheus_client")
SERVICES = ("trainer", "indexer", "retrieval_api")  # the publisher lives in trainer/
# The API's `--catalog planted:N[:SEED]` (a demo and test catalogue) builds the planted world on demand;
# that lazy import is the one way a service reaches a world, kept so the setting behaves as before.
ALLOWED_WORLD_IMPORTS = {("retrieval_api/catalogs.py", "worlds.planted")}


def test_model_package_imports_no_serving_stack() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(hsnn.__path__, "hsnn."))
    assert "hsnn.model" in modules and "hsnn.serving" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    roots = {name.split(".")[0] for name in loaded}
    assert not roots & set(SERVING_STACK), sorted(roots & set(SERVING_STACK))
    assert not roots & {"streaming", "worlds", *SERVICES}, "the model package imports a layer above it"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_service_imports_a_simulated_world() -> None:
    found = set()
    for service in SERVICES:
        for path in sorted((ROOT / service).rglob("*.py")):
            for name in _imports(path):
                if name == "worlds" or name.startswith("worlds."):
                    found.add((str(path.relative_to(ROOT)), name))
    assert found <= ALLOWED_WORLD_IMPORTS, sorted(found - ALLOWED_WORLD_IMPORTS)


def test_lower_layers_do_not_import_upper_ones() -> None:
    upper = {"hsnn": {"streaming", "worlds", *SERVICES}, "streaming": {"worlds", *SERVICES}}
    for package, banned in upper.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = {name for name in _imports(path) if name.split(".")[0] in banned}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
