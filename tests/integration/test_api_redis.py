"""The API serving the indexer's Redis index (real Redis): the pair it loads, and item churn between versions."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import redis as redis_lib
import torch

from hsnn.index import build_index
from hsnn.model import HSNN
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import ServingState
from streaming.events import ItemEvent, ItemFeatures
from streaming.index_store import ItemEncoder, allocate_version, apply_item_events, flip_pointer, write_index
from streaming.snapshots import SnapshotStore
from worlds.planted import briefly_trained, make_users, make_world

pytestmark = pytest.mark.integration

NUM_ADS = 240
SEEDED = 200  # the index starts with the first 200 ads; the rest arrive as create events


@pytest.fixture(scope="module")
def world():
    return make_world(num_items=NUM_ADS, seed=21)


@pytest.fixture(scope="module")
def model(world) -> HSNN:
    return briefly_trained(world, batches=4, seed=3)


def _create(world, row: int, seq: int, op: str = "create") -> ItemEvent:
    features = None
    if op != "expire":
        features = ItemFeatures(
            dense=world.items.dense[row].tolist(),
            sparse={name: int(world.items.sparse[name][row]) for name in ("advertiser", "category")},
        )
    return ItemEvent(op=op, ad_id=int(world.item_ids[row]), event_time=time.time(), sequence=seq, features=features)


def _body(world) -> dict:
    users, _ = make_users(world, 1, seed=4)
    history = [
        {
            "attributes": {name: int(v[0, h]) for name, v in users.history.items()},
            "age_hours": float(users.history_age[0, h]),
        }
        for h in torch.nonzero(users.history["item_id"][0] > 0).flatten().tolist()
    ]
    sparse = {name: [i for i in ids[0].tolist() if i > 0] for name, ids in users.sparse.items()}
    return {"user": {"dense": users.dense[0].tolist(), "sparse": sparse, "history": history}, "k": 1000}


def test_api_serves_the_redis_index_and_follows_item_churn(tmp_path, redis_server, world, model):
    redis = redis_lib.Redis.from_url(redis_server.url)
    prefix = f"api-{uuid.uuid4().hex[:8]}:"
    store = SnapshotStore(tmp_path / "store")
    snapshot = store.write(model).version
    store.promote(snapshot)
    seeded = torch.arange(SEEDED)
    index = build_index(model, world.item_ids[seeded], world.items.select(seeded))
    version = allocate_version(redis, prefix)
    write_index(redis, index, version, snapshot, prefix=prefix)
    assert flip_pointer(redis, None, version, prefix=prefix)

    settings = ApiSettings(
        beams=[64, 256],
        max_wait_ms=1,
        reload_interval_s=0.05,
        delta_interval_s=0.05,
        store_dir=str(store.root),
        redis_url=redis_server.url,
        key_prefix=prefix,
    )
    app = create_app(settings, ServingState())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    body = _body(world)

    async def served_ids() -> set[int]:
        response = await client.post("/retrieve", json=body)
        assert response.status_code == 200, response.text
        payload = response.json()
        assert (payload["model_version"], payload["index_version"]) == (snapshot, version)
        return {ad["ad_id"] for ad in payload["ads"]}

    async def until(predicate, timeout: float = 2.0) -> float:
        started = time.monotonic()
        while not await predicate():
            assert time.monotonic() - started < timeout, "not visible within the time limit"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def scenario() -> None:
        async with app.router.lifespan_context(app), client:

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await until(ready, timeout=20)
            assert await served_ids() == set(world.item_ids[:SEEDED].tolist())
            status = (await client.get("/status.json")).json()  # read through the app's own Redis index source
            assert status["index"]["source"] == "redis" and "error" not in status["index"]
            assert (status["index"]["current_version"], status["index"]["model_version"]) == (version, snapshot)
            assert status["served"]["index_created_at"] == status["index"]["created_at"] is not None

            encoder = ItemEncoder(model, version)
            new_rows = list(range(SEEDED, SEEDED + 5))
            outcomes = apply_item_events(redis, [_create(world, r, 1) for r in new_rows], encoder, prefix=prefix)
            assert outcomes == ["applied"] * 5
            new_ids = set(world.item_ids[new_rows].tolist())

            async def created_visible() -> bool:
                return new_ids <= await served_ids()

            await until(created_visible)
            gone = int(world.item_ids[0])
            apply_item_events(redis, [_create(world, 0, 2, op="expire")], encoder, prefix=prefix)

            async def expired_gone() -> bool:
                return gone not in await served_ids()

            await until(expired_gone)

    asyncio.run(scenario())
    redis.close()
