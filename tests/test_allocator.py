"""The benches re-run themselves under jemalloc when it is installed, and never when told not to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clitools.allocator import jemalloc_library

PROBE = (
    "from clitools.allocator import reexec_under_jemalloc\n"
    "reexec_under_jemalloc()\n"
    "import os\n"
    "maps = open('/proc/self/maps').read()\n"
    "print('jemalloc' in maps, os.environ.get('MALLOC_CONF', ''))\n"
)


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "HSNN_ALLOCATOR")}
    command = [sys.executable, "-c", PROBE]
    out = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(jemalloc_library() is None or not os.path.exists("/proc/self/maps"), reason="no jemalloc here")
def test_reexec_loads_jemalloc_with_pages_kept() -> None:
    assert _probe() == "True dirty_decay_ms:-1,muzzy_decay_ms:-1"


def test_opting_out_keeps_the_system_malloc() -> None:
    assert _probe(HSNN_ALLOCATOR="system") == "False"
