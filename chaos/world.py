"""What the experiments run against: a small planted world, tiny models, request bodies, a live API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
import uvicorn

from bench.loadgen import user_bodies
from hsnn.model import HSNN
from worlds.planted import PlantedWorld, make_users, make_world, tiny_hsnn_config

BEAMS = [3, 3]
NUM_ADS = 240


def planted_world(num_items: int = NUM_ADS, seed: int = 5) -> PlantedWorld:
    return make_world(num_items=num_items, seed=seed)


def tiny_model(seed: int) -> HSNN:
    """An untrained tiny HSNN; different seeds rank differently, which is all a swap check needs."""
    torch.manual_seed(seed)
    return HSNN(tiny_hsnn_config(num_nodes=(8, 4))).eval()


def request_bodies(world: PlantedWorld, count: int = 8, k: int = 10) -> list[dict]:
    return user_bodies(make_users(world, count, seed=2)[0], k=k)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class StatusCounter:
    """ASGI wrapper that counts response statuses (what the server really answered)."""

    app: Any
    statuses: Counter = field(default_factory=Counter)

    async def __call__(self, scope, receive, send) -> None:
        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.statuses[int(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, send if scope["type"] != "http" else counting_send)

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)


@contextlib.contextmanager
def live_api(app: Any, port: int | None = None) -> Iterator[tuple[str, StatusCounter]]:
    """Serve `app` with uvicorn on a loopback port in a thread; yields (base url, status counter)."""
    counter = StatusCounter(app)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(counter, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="chaos-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", counter
    finally:
        server.should_exit = True
        thread.join(timeout=15)


async def wait_until(predicate, timeout: float, what: str) -> float:
    """Poll an async predicate; returns the seconds it took, raises TimeoutError naming `what`."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def item_batch_bodies(events: list[Any], size: int) -> list[bytes]:
    """POST /items/events bodies of `size` events each, encoded once (a client's JSON costs nothing per post)."""
    return [
        json.dumps({"events": [e.model_dump(mode="json", exclude_none=True) for e in events[i : i + size]]}).encode()
        for i in range(0, len(events), size)
    ]


async def post_items(
    client: httpx.AsyncClient, body: bytes, token: str, read_202: bool = False
) -> tuple[int, float, Any]:
    """One authenticated POST /items/events; returns (status, seconds, JSON answer or None).

    A 202's answer (a position per record) is parsed only with `read_202`: 1,000 of them would load the client.
    """
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    started = time.perf_counter()
    try:
        response = await client.post("/items/events", content=body, headers=headers)
    except httpx.HTTPError as err:
        return 0, time.perf_counter() - started, f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - started
    if response.status_code == 202 and not read_202:
        return 202, seconds, None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    return response.status_code, seconds, answer


def http_post(path: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 POST of a JSON body, ready to write (`HttpConnection.exchange`)."""
    head = f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


CONNECTION_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
"""What `HttpConnection.exchange` raises when a request gets no answer."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a load client that costs next to nothing.

    httpx's pool, shared by hundreds of concurrent requests in one process, scans its connections for
    every request and became the bottleneck of E8 and the soak (the client, not the server, set the
    rate). `exchange` writes one prepared request and reads the answer (Content-Length bodies, which
    is all the API sends); it raises OSError, TimeoutError or asyncio.IncompleteReadError when the
    connection fails, after which the connection is closed and opens afresh on the next exchange.
    """

    IDLE_EXPIRY_S = 30.0
    """A connection idle this long is closed before it is used again: shorter than the server's keep-alive
    timeout, so the client never sends on a connection the server is closing (the race httpx's 5 s against
    uvicorn's 5 s lost, and the soak's first run of this client lost 55 times in 36,000)."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port, self.timeout = port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used_at = 0.0

    async def exchange(self, request: bytes) -> int:
        """Send `request`, read the whole answer; returns its status."""
        now = time.monotonic()
        if self._reader is not None and (self._reader.at_eof() or now - self._used_at > self.IDLE_EXPIRY_S):
            self.close()  # the server closed it while idle, or it may be about to
        self._used_at = now
        try:
            async with asyncio.timeout(self.timeout):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert self._reader is not None
                self._writer.write(request)
                head = await self._reader.readuntil(b"\r\n\r\n")
                fields = dict(_header_field(line) for line in head.split(b"\r\n")[1:] if b":" in line)
                await self._reader.readexactly(int(fields.get(b"content-length", b"0")))
        except CONNECTION_ERRORS:
            self.close()
            raise
        if fields.get(b"connection", b"").lower() == b"close":
            self.close()
        return int(head.split(b" ", 2)[1])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _header_field(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


def quantiles_ms(seconds: list[float], suffix: str = "") -> dict[str, float | None]:
    """p50 and p99 of `seconds`, in ms (None when empty), keyed `p50_ms{suffix}`, `p99_ms{suffix}`."""
    ordered = sorted(seconds)

    def at(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else None

    return {f"p50_ms{suffix}": at(0.5), f"p99_ms{suffix}": at(0.99)}


async def closed_loop(port: int, bodies: list[dict], clients: int, seconds: float, timeout: float = 60.0) -> dict:
    """`clients` closed-loop POST /retrieve clients for `seconds` (after 2 s unmeasured), one keep-alive
    `HttpConnection` each: every status, every request that got no answer by the kind of error, answers a
    second, and the p50/p99 of the 200s."""
    requests = [http_post("/retrieve", json.dumps(body).encode()) for body in bodies]
    tally = _LoadTally()
    stop = False

    async def client_loop(number: int) -> None:
        connection = HttpConnection(port, timeout)
        while not stop:
            started = time.perf_counter()
            await tally.exchange(connection, requests[number % len(requests)], started)
            number += clients
        connection.close()

    tasks = [asyncio.create_task(client_loop(n)) for n in range(clients)]
    await asyncio.sleep(2.0)
    tally.measuring = True
    await asyncio.sleep(seconds)
    tally.measuring, stop = False, True
    await asyncio.gather(*tasks)
    return tally.summary(seconds)


async def open_loop(port: int, bodies: list[dict], rate: float, seconds: float, timeout: float = 60.0) -> dict:
    """POST /retrieve at `rate` a second for `seconds`: each request is sent at its time whatever is still in
    flight, on an idle keep-alive connection (a new one when none is), and its latency runs from that time."""
    requests = [http_post("/retrieve", json.dumps(body).encode()) for body in bodies]
    tally = _LoadTally(measuring=True)
    idle: list[HttpConnection] = []
    pending: set[asyncio.Task] = set()

    async def one(number: int, due: float) -> None:
        connection = idle.pop() if idle else HttpConnection(port, timeout)
        if await tally.exchange(connection, requests[number % len(requests)], due):
            idle.append(connection)

    start = time.perf_counter()
    number = 0
    while (due := start + number / rate) < start + seconds:
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(number, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        number += 1
    await asyncio.gather(*pending)
    for connection in idle:
        connection.close()
    return tally.summary(seconds) | {"offered_qps": rate}


@dataclass
class _LoadTally:
    measuring: bool = False
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    async def exchange(self, connection: HttpConnection, request: bytes, since: float) -> bool:
        """One request; counted while measuring. False when it got no answer (the connection is then closed)."""
        try:
            status = await connection.exchange(request)
        except CONNECTION_ERRORS as exc:
            if self.measuring:
                self.errors[type(exc).__name__] += 1
            return False
        if self.measuring:
            self.statuses[str(status)] += 1
            if status == 200:
                self.latencies.append(time.perf_counter() - since)
        return True

    def summary(self, seconds: float) -> dict:
        return {
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
            "answered_per_s": round(sum(self.statuses.values()) / seconds, 1),
            "qps_200": round(self.statuses.get("200", 0) / seconds, 1),
            **quantiles_ms(self.latencies),
        }
