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
