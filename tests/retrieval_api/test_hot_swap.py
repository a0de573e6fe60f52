"""The snapshot watcher: follows the PROMOTED pointer both ways (rollbacks too), swaps under load, refuses corrupt
snapshots."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from hsnn.index import build_index
from hsnn.model import HSNN
from hsnn.serving import retrieve
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, CatalogIndexSource, ServingState
from streaming.events import UserFeatures, users_to_batch
from streaming.snapshots import SnapshotStore
from worlds.planted import make_users, make_world, tiny_hsnn_config, user_json

BEAMS = [3, 3]


@pytest.fixture(scope="module")
def world():
    return make_world(num_items=300, seed=5)


@pytest.fixture(scope="module")
def models() -> list[HSNN]:
    """Three differently initialised models (no training needed: they only have to rank differently)."""
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append(HSNN(tiny_hsnn_config(num_nodes=(8, 4))).eval())
    return out


@pytest.fixture(scope="module")
def bodies(world) -> list[dict]:
    users = make_users(world, 6, seed=2)[0]
    return [{"user": user_json(users, row), "k": 10} for row in range(len(users))]


def make_app(store: SnapshotStore, world, **overrides):
    settings = ApiSettings(**{"beams": BEAMS, "max_wait_ms": 1, "reload_interval_s": 0.02, **overrides})
    source = CatalogIndexSource(Catalog(item_ids=world.item_ids, items=world.items))
    app = create_app(settings, ServingState(), store=store, index_source=source)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    return app, client


async def wait_for(predicate, timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < until, "timed out"
        await asyncio.sleep(0.01)


def served_version(app) -> int:
    pair = app.state.serving.current()
    return pair.model_version if pair else 0


def metric(app, name: str, **labels) -> float:
    value = app.state.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def corrupt(store: SnapshotStore, version: int) -> None:
    weights = store.path(version) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")


def test_watcher_swaps_to_new_promotions_under_load(tmp_path, world, models, bodies):
    store = SnapshotStore(tmp_path)
    store.promote(store.write(models[0]).version)
    app, client = make_app(store, world)
    outcomes: list[tuple[int, int, int]] = []  # (worker, model_version, index_version) in answer order
    errors: list[str] = []

    async def worker(number: int, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            response = await client.post("/retrieve", json=bodies[(number + i) % len(bodies)])
            i += 1
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text}")
                continue
            body = response.json()
            outcomes.append((number, body["model_version"], body["index_version"]))

    async def scenario() -> None:
        async with app.router.lifespan_context(app), client:
            await wait_for(lambda: served_version(app) == 1)
            stop = asyncio.Event()
            workers = [asyncio.create_task(worker(n, stop)) for n in range(6)]
            await wait_for(lambda: len(outcomes) >= 20)
            for model in models[1:]:
                manifest = store.write(model, parent=served_version(app))
                store.promote(manifest.version)
                await wait_for(lambda v=manifest.version: served_version(app) == v)
                seen = len(outcomes)
                await wait_for(lambda seen=seen: len(outcomes) >= seen + 20)
            rolled_back_from = len(outcomes)
            store.promote(1)  # the runbook's rollback: the pointer moves back and is followed
            await wait_for(lambda: served_version(app) == 1)
            seen = len(outcomes)
            await wait_for(lambda: len(outcomes) >= seen + 20)
            stop.set()
            await asyncio.gather(*workers)
            assert served_version(app) == 1
            return rolled_back_from

    rolled_back_from = asyncio.run(scenario())
    assert 'hsnn_api_reloads_total{outcome="success"} 4.0' in metrics_text_of(app)
    assert 'hsnn_api_reloads_total{outcome="failure"} 0.0' in metrics_text_of(app)
    assert not errors, errors[:3]
    assert {(m, i) for _, m, i in outcomes} == {(1, 1), (2, 2), (3, 3)}
    assert outcomes[-1][1] == 1  # answered by the rolled-back model at the end
    for number in range(6):  # every client saw the promotions in order: 1, 2, 3, then back to 1
        versions = [m for w, m, _ in outcomes if w == number]
        changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
        assert is_subsequence(changes, [1, 2, 3, 1]), changes
    assert outcomes[rolled_back_from - 1][1] == 3  # the newest model served right up to the rollback
    assert metric(app, "hsnn_api_served_snapshot_timestamp_seconds") == store.manifest(1).created_at


def metrics_text_of(app) -> str:
    from prometheus_client import generate_latest

    return generate_latest(app.state.metrics.registry).decode()


def is_subsequence(items: list[int], sequence: list[int]) -> bool:
    remaining = iter(sequence)
    return all(any(item == candidate for candidate in remaining) for item in items)


def test_corrupt_promotion_is_refused_counted_and_old_pair_keeps_serving(tmp_path, world, models, bodies, caplog):
    store = SnapshotStore(tmp_path)
    store.promote(store.write(models[0]).version)
    app, client = make_app(store, world, reload_interval_s=3600, reload_backoff_s=0.3)
    watcher = app.state.watcher

    async def scenario() -> None:
        async with app.router.lifespan_context(app), client:
            await wait_for(lambda: served_version(app) == 1)  # the first poll runs at start-up
            store.write(models[1], parent=1)
            corrupt(store, 2)
            store.promote(2)
            assert await watcher.poll_once() == "failure"
            assert await watcher.poll_once() is None  # same pointer: not retried before the backoff
            response = await client.post("/retrieve", json=bodies[0])
            assert response.status_code == 200 and response.json()["model_version"] == 1
            await asyncio.sleep(0.35)
            assert await watcher.poll_once() == "failure"  # retried after the backoff, still corrupt
            time.sleep(0.01)
            store.promote(2)  # promoted again: a new pointer is tried at once
            assert await watcher.poll_once() == "failure"
            store.promote(store.write(models[2], parent=1).version)
            assert await watcher.poll_once() == "success"
            response = await client.post("/retrieve", json=bodies[0])
            assert response.json()["model_version"] == response.json()["index_version"] == 3
            text = (await client.get("/metrics")).text
        assert 'hsnn_api_reloads_total{outcome="failure"} 3.0' in text
        assert 'hsnn_api_reloads_total{outcome="success"} 2.0' in text
        assert "hsnn_api_reload_duration_seconds_count 5.0" in text

    with caplog.at_level("ERROR", logger="hsnn.retrieval_api"):
        asyncio.run(scenario())
    assert "could not load promoted snapshot 2 (CorruptSnapshot" in caplog.text
    assert "keep serving 1" in caplog.text


def test_a_failing_index_source_keeps_the_old_pair(tmp_path, world, models):
    store = SnapshotStore(tmp_path)
    store.promote(store.write(models[0]).version)

    class Flaky(CatalogIndexSource):
        fail = False

        def load(self, model, model_version):
            if self.fail:
                raise ConnectionError("catalogue unreachable")
            return super().load(model, model_version)

    source = Flaky(Catalog(item_ids=world.item_ids, items=world.items))
    app = create_app(ApiSettings(beams=BEAMS, reload_interval_s=3600), store=store, index_source=source)

    async def scenario() -> None:
        watcher = app.state.watcher
        assert await watcher.poll_once() == "success"
        source.fail = True
        store.promote(store.write(models[1]).version)
        assert await watcher.poll_once() == "failure"
        assert served_version(app) == 1
        source.fail = False
        store.promote(2)
        assert await watcher.poll_once() == "success"
        assert served_version(app) == 2

    asyncio.run(scenario())
    assert metric(app, "hsnn_api_reloads_total", outcome="failure") == 1


def test_without_a_store_no_watcher_runs(world):
    assert create_app(ApiSettings(beams=BEAMS)).state.watcher is None
    app = create_app(ApiSettings(beams=BEAMS, catalog="planted:50"))
    assert app.state.watcher is None  # a catalogue alone is not enough


def test_a_hot_swap_serves_the_new_models_tables(tmp_path, world, models, bodies):
    """After a promotion the answers are the new model's, scored through tables built for it: the served ids and
    scores equal the new model's own wide-beam retrieval over an index built from scratch (stale tables from
    the old model would score differently)."""
    store = SnapshotStore(tmp_path)
    store.promote(store.write(models[0]).version)
    app, client = make_app(store, world, beams=[8, 4])
    body = bodies[0]

    async def scenario() -> tuple[dict, dict]:
        async with app.router.lifespan_context(app), client:
            await wait_for(lambda: served_version(app) == 1)
            before = (await client.post("/retrieve", json=body)).json()
            store.promote(store.write(models[1], parent=1).version)
            await wait_for(lambda: served_version(app) == 2)
            return before, (await client.post("/retrieve", json=body)).json()

    before, after = asyncio.run(scenario())
    users = users_to_batch([UserFeatures(**body["user"])], models[1].config.features)
    expected = retrieve(models[1], build_index(models[1], world.item_ids, world.items), users, k=10, beams=[8, 4])[0]
    assert [ad["ad_id"] for ad in after["ads"]] == expected.item_ids.tolist()
    assert [ad["ad_id"] for ad in before["ads"]] != expected.item_ids.tolist()
    torch.testing.assert_close(
        torch.tensor([ad["score"] for ad in after["ads"]]), expected.scores, rtol=1e-4, atol=1e-6
    )
