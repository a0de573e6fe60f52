"""Freshness metrics: built from the manifest's timestamps at the moment a snapshot is adopted (swapped in).

The manifests are written under a fixed wall clock and the API's metrics read an injected one, so every
figure is exact: published -> served = adopted_at - created_at, event -> served = adopted_at -
event_time_watermark. A histogram computed from anything else (the load time, the real clock, the pointer's
promoted_at, the previous pair) gives other numbers and fails these tests.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from hsnn.model import HSNN
from retrieval_api.app import create_app
from retrieval_api.batcher import Batcher
from retrieval_api.metrics import ApiMetrics
from retrieval_api.scoring import PairScorer
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, CatalogIndexSource, ServingState
from retrieval_api.watcher import SUCCESS, SnapshotWatcher
from streaming.snapshots import SnapshotStore
from trainer.metrics import TrainerMetrics, observe_many
from trainer.publisher import Publisher, PublisherMetrics, PublisherSettings
from trainer.service import OnlineTrainer
from worlds.planted import make_world, tiny_hsnn_config

PUBLISHED_TO_SERVED = "hsnn_api_snapshot_published_to_served_seconds"
EVENT_TO_SERVED = "hsnn_api_event_to_served_seconds"


@pytest.fixture(scope="module")
def world():
    return make_world(num_items=200, seed=3)


@pytest.fixture(scope="module")
def model() -> HSNN:
    torch.manual_seed(0)
    return HSNN(tiny_hsnn_config(num_nodes=(8, 4))).eval()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_at(store: SnapshotStore, model: HSNN, created_at: float, watermark: float | None, monkeypatch) -> int:
    """Write and promote a snapshot whose manifest says `created_at` (the store stamps it with time.time())."""
    with monkeypatch.context() as patch:
        patch.setattr("streaming.snapshots.time.time", lambda: created_at)
        manifest = store.write(model, event_time_watermark=watermark)
        store.promote(manifest.version)
    return manifest.version


def rig(store: SnapshotStore, world, clock: Clock) -> tuple[SnapshotWatcher, ApiMetrics, ServingState]:
    state = ServingState()
    metrics = ApiMetrics(CollectorRegistry(), state, Batcher(PairScorer(state, beams=[3, 3])), clock=clock)
    catalog = Catalog(item_ids=world.item_ids, items=world.items)
    watcher = SnapshotWatcher(
        store,
        CatalogIndexSource(catalog),
        state,
        on_reload=metrics.observe_reload,
        on_adopt=metrics.observe_adoption,
    )
    return watcher, metrics, state


def sample(metrics: ApiMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_adoption_observes_adopted_at_minus_manifest_timestamps(tmp_path, world, model, monkeypatch) -> None:
    store = SnapshotStore(tmp_path)
    clock = Clock(900.0)  # the API starts watching at t=900
    watcher, metrics, _ = rig(store, world, clock)

    write_at(store, model, created_at=1000.0, watermark=990.0, monkeypatch=monkeypatch)
    clock.now = 1003.5
    assert asyncio.run(watcher.poll_once()) == SUCCESS
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_count") == 1
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_sum") == pytest.approx(3.5)
    assert sample(metrics, f"{EVENT_TO_SERVED}_sum") == pytest.approx(13.5)
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_bucket", le="3.0") == 0
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_bucket", le="5.0") == 1
    # The gauges carry the raw timestamps of what is served (ages are computed in PromQL).
    assert sample(metrics, "hsnn_api_served_snapshot_timestamp_seconds") == 1000.0
    assert sample(metrics, "hsnn_api_served_snapshot_event_time_seconds") == 990.0

    write_at(store, model, created_at=1010.0, watermark=1008.0, monkeypatch=monkeypatch)
    clock.now = 1012.0
    assert asyncio.run(watcher.poll_once()) == SUCCESS
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_count") == 2
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_sum") == pytest.approx(3.5 + 2.0)
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_bucket", le="2.0") == 1
    assert sample(metrics, f"{EVENT_TO_SERVED}_sum") == pytest.approx(13.5 + 4.0)
    assert sample(metrics, "hsnn_api_served_snapshot_event_time_seconds") == 1008.0
    assert [(a.model_version, a.published_to_served_s, a.event_to_served_s) for a in metrics.adoptions] == [
        (1, 3.5, 13.5),
        (2, 2.0, 4.0),
    ]


def test_a_start_on_an_old_snapshot_and_a_rollback_are_not_observed(tmp_path, world, model, monkeypatch) -> None:
    store = SnapshotStore(tmp_path)
    old = write_at(store, model, created_at=1000.0, watermark=None, monkeypatch=monkeypatch)
    clock = Clock(5000.0)  # the API starts long after snapshot 1 was published
    watcher, metrics, state = rig(store, world, clock)
    assert asyncio.run(watcher.poll_once()) == SUCCESS
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_count") == 0  # not a 4000 s "publish -> served"
    assert sample(metrics, "hsnn_api_served_snapshot_timestamp_seconds") == 1000.0
    assert sample(metrics, "hsnn_api_served_snapshot_event_time_seconds") == 0  # unknown

    write_at(store, model, created_at=5010.0, watermark=None, monkeypatch=monkeypatch)
    clock.now = 5011.0
    assert asyncio.run(watcher.poll_once()) == SUCCESS
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_sum") == pytest.approx(1.0)
    assert sample(metrics, f"{EVENT_TO_SERVED}_count") == 0  # no watermark, no event -> served sample

    store.promote(old)  # rollback: serving an old snapshot again is not a freshness sample
    clock.now = 5020.0
    assert asyncio.run(watcher.poll_once()) == SUCCESS
    assert state.current().model_version == old
    assert sample(metrics, f"{PUBLISHED_TO_SERVED}_count") == 1
    assert [a.observed for a in metrics.adoptions] == [False, True, False]


def test_the_app_records_adoptions_and_reports_them_in_status_json(tmp_path, world, model) -> None:
    store = SnapshotStore(tmp_path)
    settings = ApiSettings(beams=[3, 3], max_wait_ms=1, reload_interval_s=0.02)
    source = CatalogIndexSource(Catalog(item_ids=world.item_ids, items=world.items))
    app = create_app(settings, ServingState(), store=store, index_source=source)

    async def scenario() -> dict:
        async with app.router.lifespan_context(app):
            manifest = store.write(model, event_time_watermark=time.time() - 30)
            store.promote(manifest.version)
            until = time.monotonic() + 30
            while not app.state.metrics.adoptions:
                assert time.monotonic() < until, "the watcher did not adopt the snapshot"
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
                return (await client.get("/status.json")).json()

    data = asyncio.run(scenario())
    (adoption,) = data["freshness"]["adoptions"]
    assert adoption["model_version"] == 1 and adoption["observed"] is True
    assert adoption["published_to_served_s"] == pytest.approx(adoption["adopted_at"] - adoption["published_at"])
    assert 0 <= adoption["published_to_served_s"] < 30
    assert 30 <= adoption["event_to_served_s"] < 60
    registry = app.state.metrics.registry
    assert registry.get_sample_value(f"{PUBLISHED_TO_SERVED}_count") == 1


def test_trainer_observes_trained_at_minus_event_time_per_event() -> None:
    trainer = OnlineTrainer.__new__(OnlineTrainer)  # only the metrics part: no Kafka, no store
    trainer.metrics = TrainerMetrics(CollectorRegistry())
    trainer.clock = Clock(2000.0)
    trainer.watermark = 1999.0
    trainer._observe_trained([SimpleNamespace(event_time=t) for t in (1999.0, 1998.5, 1990.0)])
    histogram = trainer.metrics.event_to_trained
    samples = {(s.name, s.labels.get("le")): s.value for metric in histogram.collect() for s in metric.samples}
    assert samples[("hsnn_trainer_event_to_trained_seconds_count", None)] == 3
    assert samples[("hsnn_trainer_event_to_trained_seconds_sum", None)] == pytest.approx(1.0 + 1.5 + 10.0)
    assert samples[("hsnn_trainer_event_to_trained_seconds_bucket", "1.0")] == 1
    assert samples[("hsnn_trainer_event_to_trained_seconds_bucket", "2.0")] == 2
    gauge = {s.name: s.value for metric in trainer.metrics.trained_event_time.collect() for s in metric.samples}
    assert gauge["hsnn_trainer_trained_event_time_seconds"] == 1999.0


def test_observe_many_writes_what_observe_would() -> None:
    values = [0.0, 0.1, 0.1000001, 0.5, 1.0, 4.99, 5.0, 5.01, 3599.0, 3600.0, 1e9, 2.5, 2.5, 0.05]
    one, many = TrainerMetrics(CollectorRegistry()), TrainerMetrics(CollectorRegistry())
    for value in values:
        one.event_to_trained.observe(value)
    observe_many(many.event_to_trained, values)

    def samples(metrics: TrainerMetrics) -> list[tuple[str, dict, float]]:
        return [
            (s.name, s.labels, s.value)
            for m in metrics.event_to_trained.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        ]

    assert samples(many) == samples(one)
    counts = [value for name, _, value in samples(one) if name.endswith("_count")]
    assert counts == [len(values)]


def test_publisher_observes_created_at_minus_the_watermark(tmp_path, model, monkeypatch) -> None:
    registry = CollectorRegistry()
    publisher = Publisher(PublisherSettings(store_dir=str(tmp_path)), metrics=PublisherMetrics(registry))
    monkeypatch.setattr("streaming.snapshots.time.time", lambda: 3000.0)
    publisher.publish(model, offsets={}, event_time_watermark=2994.0, eval_metrics={})
    assert registry.get_sample_value("hsnn_publisher_event_to_published_seconds_sum") == pytest.approx(6.0)
    assert registry.get_sample_value("hsnn_publisher_published_event_time_seconds") == 2994.0
    assert registry.get_sample_value("hsnn_publisher_last_published_timestamp_seconds") == 3000.0
