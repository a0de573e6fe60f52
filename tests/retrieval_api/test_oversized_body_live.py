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
import threading
import time
from pathlib import Path

import pytest

from bench.loadgen import free_port

BODY_MB = 200
LIMIT = 1 << 20
TOKEN = "e8-lite-token"
CHUNK = b"[" + b"1," * (32 << 10)  # 64 KiB of a JSON array that never ends


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


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


def upload(port: int, path: str, chunked: bool, headers: dict[str, str]) -> tuple[int, int]:
    """Send a 200 MB body (declared, or chunked without a length) until the server answers; (status, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = [f"POST {path} HTTP/1.1", "Host: api", "Content-Type: application/json", *map(": ".join, headers.items())]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY_MB << 20}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sent = 0

    def send() -> None:
        nonlocal sent
        frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
        try:
            while sent < BODY_MB << 20:
                sock.sendall(frame)
                sent += len(CHUNK)
        except OSError:  # the server answered and closed: it does not read the rest
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    status_line = sock.makefile("rb").readline().decode()
    sock.close()
    sender.join(timeout=30)
    return int(status_line.split()[1]), sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/retrieve", "/items/events"])
def test_a_200_mb_body_is_413_before_it_is_buffered(server, path, chunked):
    process, port = server
    headers = {"Authorization": f"Bearer {TOKEN}"} if path == "/items/events" else {}
    upload(port, path, chunked, headers)  # warm-up: first-request allocations are not the body's
    before = rss_mb(process.pid)
    status, sent = upload(port, path, chunked, headers)
    grown = rss_mb(process.pid) - before
    assert status == 413
    assert sent < BODY_MB << 20  # answered while the client was still sending
    assert grown < 5, f"RSS grew {grown:.1f} MB"
