"""E8-lite: a 200 MB body against the real server process is answered 413 without the process growing.

The API runs as `python -m retrieval_api` (uvicorn, its own process, so its RSS is its own). Each
upload is refused with 413 while the client is still sending; the server's resident memory may
move by a few MB at most, far from the 200 MB (and the ~600 MB a parsed JSON body of that size
costs) that buffering would need.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.loadgen import free_port, rss_mb
from chaos.e8_hostile_clients import upload

BODY_MB = 200
LIMIT = 1 << 20
TOKEN = "e8-lite-token"


@pytest.fixture(scope="module")
def server():
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's RSS")
    port = free_port()
    env = {**os.environ, "HSNN_API_ITEMS_TOKEN": TOKEN, "HSNN_API_MAX_BODY_BYTES": str(LIMIT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "retrieval_api", "--port", str(port), "--log-level", "WARNING"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
    yield process, port
    process.terminate()
    process.wait(timeout=20)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/retrieve", "/items/events"])
def test_a_200_mb_body_is_413_before_it_is_buffered(server, path, chunked):
    process, port = server
    headers = {"Authorization": f"Bearer {TOKEN}"} if path == "/items/events" else {}
    upload(port, path, chunked, headers, BODY_MB)  # warm-up: first-request allocations are not the body's
    before = rss_mb(process.pid)
    status, sent = upload(port, path, chunked, headers, BODY_MB)
    grown = rss_mb(process.pid) - before
    assert status == 413
    assert sent < BODY_MB << 20  # answered while the client was still sending
    assert grown < 5, f"RSS grew {grown:.1f} MB"
