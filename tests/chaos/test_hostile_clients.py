"""What chaos E8 added to the API process: a header timeout (slowloris) and 429 before the body while the queue is full.

`python -m chaos e8` is the full experiment (200 MB bodies, 1,000 slowloris sockets, 1,000 clients).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import uvicorn

from chaos.world import free_port
from retrieval_api.connections import header_timeout_protocol
from retrieval_api.limits import RequestGate, refuse_when_full

HEADER_TIMEOUT_S = 0.5


async def hello(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", http=header_timeout_protocol(HEADER_TIMEOUT_S)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    return server, thread, port


def closed_after(sock: socket.socket, trickle: bytes, interval: float, limit: float) -> float | None:
    """Send `trickle` one byte per `interval`; the seconds until the server closed the socket (None: not in `limit`)."""
    started = time.monotonic()
    sock.settimeout(interval)
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            return None
    return None


def test_a_connection_that_trickles_its_headers_is_closed_and_honest_ones_are_not():
    server, thread, port = serve(hello)
    try:
        # Slowloris: a byte every 0.1 s never completes the headers; the timeout is on the whole header.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            took = closed_after(sock, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 100, 0.1, 5.0)
        assert took is not None and HEADER_TIMEOUT_S - 0.1 <= took < HEADER_TIMEOUT_S + 1.5, took
        # A silent connection is closed too.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            started = time.monotonic()
            assert sock.recv(1) == b"" and time.monotonic() - started < HEADER_TIMEOUT_S + 1.5
        # Kept-alive requests spaced by more than the header timeout (but under keep-alive's 5 s) all pass.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):
                assert client.post("/", content=b"x" * 100_000).text == "ok"
                time.sleep(HEADER_TIMEOUT_S * 1.5)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class FullQueue:
    def __init__(self, depth: int, queue_size: int) -> None:
        self.depth, self.queue_size = depth, queue_size


def test_a_full_queue_is_answered_429_before_the_body_is_read():
    read: list[bool] = []

    async def app(scope, receive, send) -> None:
        read.append(True)
        await hello(scope, receive, send)

    queue = FullQueue(depth=4, queue_size=4)
    gate = RequestGate(app, max_body_bytes=1 << 20, authenticate={("POST", "/retrieve"): refuse_when_full(queue)})

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.post("/retrieve", content=b"{}")

    refused = asyncio.run(post())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1" and read == []
    assert "4 requests are already waiting" in refused.json()["detail"]
    queue.depth = 3
    assert asyncio.run(post()).status_code == 200 and read == [True]
