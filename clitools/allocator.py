"""Run CPU-heavy tools under jemalloc that keeps its pages.

glibc's malloc hands every block over 32 MiB back to the kernel when it is freed, so a training step whose
pair tensors are that large (the benchmark's in-batch softmax: 32,000 pairs x 10 embeddings x 64 dims is
82 MB per tensor) page-faults its memory in again on every step: 2 million minor faults and 5 s of kernel
time per Gowalla MoNN step, half the step. jemalloc with decay off reuses the pages: the same step went
from 9.5 to 4.5 s (docs/benchmarks.md). Debian's redis-server depends on libjemalloc2, so machines set up
by scripts/setup.sh have it; elsewhere the tools run on the system malloc as before. `python -m retrieval_api`
does the same (a batch of 32 queries builds pair tensors of that size); the `hsnn-api` console script and
the image do not, unless LD_PRELOAD is set there.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

# Never return freed pages to the kernel. A finite decay (30 s) purges them as it goes and lost most of the
# gain (MovieLens MoNN, 60 steps of 1,000 rows: 161 s and 0.6M minor faults with decay off, 271 s and 73M
# faults with 30 s). The cost: a long multi-phase run keeps its peak; the full simulator benchmark reached
# 23 GB here and was OOM-killed, so run that one with HSNN_ALLOCATOR=system.
RETAIN_PAGES = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def jemalloc_library() -> str | None:
    """The loader's name of the installed jemalloc (e.g. libjemalloc.so.2), or None."""
    return ctypes.util.find_library("jemalloc")


def reexec_under_jemalloc() -> None:
    """Replace this process by the same command under jemalloc (LD_PRELOAD), once; call it first thing from a
    script's `__main__` block only, never from code a test imports. HSNN_ALLOCATOR=system opts out."""
    if os.environ.get("HSNN_ALLOCATOR", "jemalloc") != "jemalloc" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    library = jemalloc_library()
    if library is None:
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD", "")]))
    env = dict(os.environ, LD_PRELOAD=preload, MALLOC_CONF=os.environ.get("MALLOC_CONF", RETAIN_PAGES))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
