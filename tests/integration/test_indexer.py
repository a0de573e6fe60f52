"""The indexer against a real Redis and a real Kafka broker: rebuilds, pointer protocol, item events, DLQ."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis as redis_lib
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from hsnn.index import build_index
from hsnn.model import HSNN
from hsnn.training import train
from indexer.catalogue_offsets import read_catalogue_offsets, write_catalogue_offsets
from indexer.gate import level_health, within_capacity
from indexer.metrics import IndexerMetrics
from indexer.service import Indexer
from indexer.settings import IndexerSettings
from streaming.events import ItemEvent, ItemFeatures, encode, event_key, read_dead_letter
from streaming.index_store import (
    IndexNotFound,
    apply_item_events,
    catalog_entry,
    current_version,
    flip_pointer,
    gc,
    load_index,
    previous_version,
    read_catalog,
    read_index,
    read_meta,
    rollback,
    write_index,
)
from streaming.snapshots import SnapshotStore
from worlds.planted import make_batches, make_world, tiny_hsnn_config

pytestmark = pytest.mark.integration

NUM_ADS = 300


@pytest.fixture(scope="module")
def world():
    return make_world(num_items=NUM_ADS, seed=11)


def _model(world, seed: int) -> HSNN:
    torch.manual_seed(seed)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4)))
    train(model, make_batches(world, 4, 128, seed=seed, users_per_batch=32))
    return model.eval()


@pytest.fixture(scope="module")
def models(world) -> list[HSNN]:
    return [_model(world, 1), _model(world, 2)]


@pytest.fixture
def redis(redis_server):
    client = redis_lib.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _event(world, row: int, seq: int, op: str = "create", dense=None, event_time: float | None = None) -> ItemEvent:
    features = None
    if op != "expire":
        features = ItemFeatures(
            dense=dense if dense is not None else world.items.dense[row].tolist(),
            sparse={
                "advertiser": int(world.items.sparse["advertiser"][row]),
                "category": int(world.items.sparse["category"][row]),
            },
        )
    return ItemEvent(
        op=op,
        ad_id=int(world.item_ids[row]),
        event_time=time.time() if event_time is None else event_time,
        sequence=seq,
        features=features,
    )


def _settings_with_store(tmp_path: Path, model: HSNN, bootstrap: str, **overrides) -> IndexerSettings:
    """A snapshot store with `model` promoted, and settings with this test's own topics and key prefix."""
    tag = uuid.uuid4().hex[:8]
    store = SnapshotStore(tmp_path / "store")
    store.promote(store.write(model).version)
    return IndexerSettings(
        redis_url="redis://unused",
        kafka_bootstrap_servers=bootstrap,
        items_topic=f"items-{tag}",
        dlq_topic=f"items-dlq-{tag}",
        group_id=f"indexer-{tag}",
        store_dir=str(store.root),
        key_prefix=f"test-{tag}:",
        chunk_bytes=4096,
        poll_timeout_ms=50,
        **overrides,
    )


def _setup(tmp_path: Path, redis, world, model: HSNN, kafka=None, seed_ads: int = NUM_ADS - 20) -> Indexer:
    """A snapshot store with `model` promoted, a catalogue of the first `seed_ads` ads, an indexer on both."""
    settings = _settings_with_store(tmp_path, model, kafka.bootstrap_servers if kafka else "127.0.0.1:1")
    if kafka is not None:
        kafka.create_topics([settings.items_topic, settings.dlq_topic])
    events = [_event(world, row, 1, event_time=1.7e9) for row in range(seed_ads)]
    assert set(apply_item_events(redis, events, None, settings.key_prefix)) == {"applied"}
    write_catalogue_offsets(redis, settings.items_topic, {}, settings.key_prefix)  # loaded whole, not from Kafka
    return Indexer(settings, redis=redis, metrics=IndexerMetrics())


def _produce(kafka, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    try:
        for key, value in values:
            producer.send(topic, key=key, value=value).get(timeout=10)
    finally:
        producer.close()


def _join(indexer: Indexer, timeout: float = 20.0) -> None:
    """Poll until the consumer group has assigned the partition (so latency tests measure indexing only)."""
    deadline = time.monotonic() + timeout
    while not indexer._get_consumer().assignment() and time.monotonic() < deadline:
        indexer.consume_once(timeout_ms=100)
    assert indexer._get_consumer().assignment()


def _started(tmp_path: Path, redis, world, model: HSNN, kafka) -> Indexer:
    """`_setup` with Kafka, then started and joined to the items topic (closed again if that fails)."""
    indexer = _setup(tmp_path, redis, world, model, kafka)
    try:
        indexer.start()
        _join(indexer)
    except BaseException:
        indexer.close()
        raise
    return indexer


def _ids(indexer: Indexer, model: HSNN) -> dict[int, int]:
    """Live ad id -> row in the index a reader sees (version + its delta)."""
    index = load_index(indexer.redis, model, prefix=indexer.prefix).index
    return {int(a): row for row, (a, live) in enumerate(zip(index.item_ids, index.live, strict=True)) if live}


def _wait_until(indexer: Indexer, condition, timeout: float = 2.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout + 3:
        indexer.consume_once(timeout_ms=20)
        if condition():
            return time.monotonic() - started
    raise AssertionError("condition not reached")


def test_rebuild_matches_the_models_hard_assignment(tmp_path, redis, world, models):
    model = models[0]
    indexer = _setup(tmp_path, redis, world, model)
    indexer.start()
    version = current_version(redis, indexer.prefix)
    assert version is not None
    meta = read_meta(redis, version, indexer.prefix)
    assert meta["model_version"] == 1 and meta["num_items"] == NUM_ADS - 20
    index = read_index(redis, version, indexer.prefix)
    rows = index.item_ids - 1  # planted ad ids are row + 1
    with torch.no_grad():
        embeddings = model.item_model.encode_items(world.items.select(rows))
    # the build caps every node (prices raised on over-full ones) and keeps those prices in the model that
    # built it, so that model's per-item assignment gives the index's paths
    builder = indexer.encoder.model
    same = (index.paths == builder.index.assign(embeddings.flatten(1))).all(dim=1).float().mean()
    assert float(same) >= 0.99
    assert within_capacity(level_health(index), indexer.settings.capacity_factor)
    torch.testing.assert_close(index.item_embeddings, embeddings)
    reg = indexer.metrics.registry
    assert reg.get_sample_value("hsnn_indexer_index_version") == version
    assert reg.get_sample_value("hsnn_indexer_rebuild_seconds_count") == 1
    assert reg.get_sample_value("hsnn_indexer_node_size_max_over_mean", {"level": "0"}) >= 1.0
    assert not indexer.check_snapshot()  # nothing new promoted: no rebuild


def test_write_read_round_trip_is_exact(redis, world, models):
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    index = build_index(models[0], world.item_ids, world.items)
    index.expire(torch.tensor([3, 5]))
    write_index(redis, index, 7, model_version=1, prefix=prefix, chunk_bytes=1000)
    out = read_index(redis, 7, prefix)
    for name in ("item_ids", "item_embeddings", "paths", "item_nodes", "leaf_items", "live"):
        assert torch.equal(getattr(out, name), getattr(index, name)), name
    assert torch.equal(out.items.dense, index.items.dense)
    assert out.items.sparse.keys() == index.items.sparse.keys()
    assert all(torch.equal(out.items.sparse[k], v) for k, v in index.items.sparse.items())
    assert out.codebook_sizes == index.codebook_sizes and len(out.levels) == len(index.levels)
    for a, b in zip(out.levels, index.levels, strict=True):
        for field in ("keys", "embedding", "projected", "representative", "child_offsets", "sizes"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    with pytest.raises(ValueError):
        write_index(redis, index, 7, model_version=1, prefix=prefix)
    with pytest.raises(IndexNotFound):
        read_index(redis, 8, prefix)


def test_pointer_compare_and_set_rollback_and_gc(redis, world, models):
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    index = build_index(models[0], world.item_ids[:50], world.items.select(torch.arange(50)))
    for version in (1, 2, 3, 4):
        write_index(redis, index, version, model_version=1, prefix=prefix)
    assert flip_pointer(redis, None, 1, prefix)
    assert not flip_pointer(redis, None, 2, prefix)  # stale: the pointer is at 1 now
    assert flip_pointer(redis, 1, 2, prefix)
    assert not flip_pointer(redis, 1, 3, prefix)  # stale expected version
    assert current_version(redis, prefix) == 2 and previous_version(redis, prefix) == 1
    with pytest.raises(ValueError):
        flip_pointer(redis, 2, 99, prefix)  # never written
    assert flip_pointer(redis, 2, 3, prefix)
    assert rollback(redis, prefix) == 2
    assert (current_version(redis, prefix), previous_version(redis, prefix)) == (2, 3)
    assert gc(redis, keep=1, prefix=prefix) == [1]  # 2 current, 3 previous, 4 above current (in flight)
    assert read_index(redis, 3, prefix).num_items == 50 and read_index(redis, 4, prefix).num_items == 50
    assert not list(redis.scan_iter(match=f"{prefix}idx:1:*"))


def test_created_ad_is_indexed_and_expired_ad_gone_within_two_seconds(tmp_path, redis, world, models, kafka_server):
    model = models[0]
    indexer = _started(tmp_path, redis, world, model, kafka_server)
    try:
        new = _event(world, NUM_ADS - 1, 1)  # not in the catalogue the index was built from
        sent = time.monotonic()
        _produce(kafka_server, indexer.settings.items_topic, [(event_key(new), encode(new))])
        _wait_until(indexer, lambda: new.ad_id in _ids(indexer, model))
        assert time.monotonic() - sent < 2.0
        view = load_index(redis, model, prefix=indexer.prefix)
        row = _ids(indexer, model)[new.ad_id]
        with torch.no_grad():
            embedding = model.item_model.encode_items(world.items.select(torch.tensor([NUM_ADS - 1])))
        assigned = indexer.encoder.model.index.assign(embedding.flatten(1))  # the model that built the index
        assert view.index.paths[row].tolist() == assigned[0].tolist()

        gone = _event(world, 0, 2, op="expire")
        sent = time.monotonic()
        _produce(kafka_server, indexer.settings.items_topic, [(event_key(gone), encode(gone))])
        _wait_until(indexer, lambda: gone.ad_id not in _ids(indexer, model))
        assert time.monotonic() - sent < 2.0
        reg = indexer.metrics.registry
        assert reg.get_sample_value("hsnn_indexer_item_event_to_indexed_seconds_count") == 2
        assert reg.get_sample_value("hsnn_indexer_item_event_to_indexed_seconds_sum") < 4.0
    finally:
        indexer.close()


def test_replayed_and_out_of_order_item_events(tmp_path, redis, world, models, kafka_server):
    model = models[0]
    indexer = _started(tmp_path, redis, world, model, kafka_server)
    try:
        ad_row = 4
        v3 = _event(world, ad_row, 3, op="update", dense=[3.0, 3.0, 3.0, 3.0])
        v2 = _event(world, ad_row, 2, op="update", dense=[2.0, 2.0, 2.0, 2.0])
        values = [(event_key(e), encode(e)) for e in (v3, v2, v3)]
        _produce(kafka_server, indexer.settings.items_topic, values)
        _wait_until(
            indexer,
            lambda: (
                (
                    indexer.metrics.registry.get_sample_value(
                        "hsnn_indexer_item_events_total", {"outcome": "superseded"}
                    )
                    or 0
                )
                >= 2
            ),
        )
        entry = catalog_entry(redis, v3.ad_id, indexer.prefix)
        assert entry.sequence == 3 and entry.features["dense"] == [3.0, 3.0, 3.0, 3.0]
        view = load_index(redis, model, prefix=indexer.prefix)
        rows = torch.nonzero((view.index.item_ids == v3.ad_id) & view.index.live).flatten()
        assert len(rows) == 1 and view.index.items.dense[rows[0]].tolist() == [3.0, 3.0, 3.0, 3.0]
        assert view.delta_seq == 1  # only the seq-3 update reached the delta
        # a stale expire cannot remove it; a newer create after an expire revives it
        late = _event(world, ad_row, 1, op="expire")
        assert indexer.apply([late]) == ["superseded"]
        assert indexer.apply([_event(world, ad_row, 5, op="expire")]) == ["applied"]
        assert v3.ad_id not in _ids(indexer, model)
        assert indexer.apply([_event(world, ad_row, 6)]) == ["applied"]
        assert v3.ad_id in _ids(indexer, model)
    finally:
        indexer.close()


def test_malformed_item_events_go_to_the_dead_letter_topic(tmp_path, redis, world, models, kafka_server):
    indexer = _setup(tmp_path, redis, world, models[0], kafka_server)
    try:
        indexer.start()
        good = _event(world, NUM_ADS - 2, 1)
        wrong_width = _event(world, NUM_ADS - 3, 1, dense=[1.0, 2.0])  # well-formed, but not the model's schema
        bad = [(b"9", b"not json"), (b"10", b'{"schema_version": 99}'), (event_key(wrong_width), encode(wrong_width))]
        _produce(kafka_server, indexer.settings.items_topic, [*bad, (event_key(good), encode(good))])
        deadline = time.monotonic() + 20
        while indexer.metrics.registry.get_sample_value("hsnn_indexer_dead_letters_total") < 3:
            indexer.consume_once(timeout_ms=200)
            assert time.monotonic() < deadline
        assert good.ad_id in _ids(indexer, models[0])
        assert catalog_entry(redis, wrong_width.ad_id, indexer.prefix) is None

        consumer = KafkaConsumer(bootstrap_servers=kafka_server.bootstrap_servers, enable_auto_commit=False)
        try:
            tp = TopicPartition(indexer.settings.dlq_topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            letters = []
            while len(letters) < 3 and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=200).values():
                    letters += [read_dead_letter(r.value) for r in records]
        finally:
            consumer.close()
        assert [(letter.key, letter.raw) for letter in letters] == bad
        assert letters[0].source_topic == indexer.settings.items_topic and letters[0].offset == 0
        assert "schema" in letters[2].reason
    finally:
        indexer.close()


def test_corrupt_snapshot_is_refused_and_a_good_one_replaces_the_index(tmp_path, redis, world, models):
    indexer = _setup(tmp_path, redis, world, models[0])
    indexer.start()
    first = current_version(redis, indexer.prefix)
    store = indexer.store
    bad = store.write(models[1]).version
    weights = store.path(bad) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    store.promote(bad)
    assert not indexer.check_snapshot()
    assert not indexer.check_snapshot()  # not retried, counted once
    assert current_version(redis, indexer.prefix) == first
    assert indexer.metrics.registry.get_sample_value("hsnn_indexer_snapshot_failures_total") == 1

    good = store.write(models[1]).version
    store.promote(good)
    assert indexer.check_snapshot()
    second = current_version(redis, indexer.prefix)
    assert second != first and read_meta(redis, second, indexer.prefix)["model_version"] == good
    assert previous_version(redis, indexer.prefix) == first
    assert rollback(redis, indexer.prefix) == first


# ------------------------------------------------------------------------------ lost Redis state, DLQ failures
def _kafka_fed_settings(tmp_path, model, kafka, *, dlq: bool = True) -> IndexerSettings:
    """Settings for an indexer whose catalogue comes only from the items topic (nothing written behind its back)."""
    settings = _settings_with_store(tmp_path, model, kafka.bootstrap_servers, dlq_flush_timeout_s=2.0)
    kafka.create_topics([settings.items_topic] + ([settings.dlq_topic] if dlq else []), partitions=2)
    return settings


def _wipe(redis, prefix: str) -> None:
    """FLUSHALL, limited to this test's keys (the session's Redis is shared)."""
    keys = list(redis.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis.delete(*keys)


def _live_count(redis, prefix: str) -> int | None:
    version = current_version(redis, prefix)
    return None if version is None else int(read_meta(redis, version, prefix)["num_live"])


def test_after_redis_loses_everything_the_catalogue_is_replayed_before_any_index(
    tmp_path, redis, world, models, kafka_server
):
    model = models[0]
    settings = _kafka_fed_settings(tmp_path, model, kafka_server)
    ads = NUM_ADS - 50
    events = [_event(world, row, 1, event_time=1.7e9) for row in range(ads)]
    _produce(kafka_server, settings.items_topic, [(event_key(e), encode(e)) for e in events])
    indexer = Indexer(settings, redis=redis, metrics=IndexerMetrics())
    seen: list[int] = []

    def turn() -> None:
        indexer.consume_once(timeout_ms=50)
        indexer.check_snapshot()
        live = _live_count(redis, indexer.prefix)
        if live is not None:
            seen.append(live)

    try:
        indexer.start()  # nothing read yet: no index from an empty catalogue
        assert current_version(redis, indexer.prefix) is None
        deadline = time.monotonic() + 30
        while _live_count(redis, indexer.prefix) != ads:
            turn()
            assert time.monotonic() < deadline, seen
        assert set(seen) == {ads}  # the first index already had every ad

        _wipe(redis, indexer.prefix)  # Redis lost everything (FLUSHALL, or a restart without persistence)
        seen.clear()
        deadline = time.monotonic() + 30
        while _live_count(redis, indexer.prefix) != ads:
            turn()
            assert time.monotonic() < deadline, seen
        assert set(seen) == {ads}  # never a shrunken index in between
        reg = indexer.metrics.registry
        assert reg.get_sample_value("hsnn_indexer_catalogue_replays_total", {"reason": "lost"}) == 1
        assert reg.get_sample_value("hsnn_indexer_rebuilds_deferred_total") >= 1
        assert len(read_catalog(redis, indexer.prefix)) == ads
    finally:
        indexer.close()


def test_offsets_wait_for_dead_letters_and_a_failing_dlq_does_not_stop_the_loop(
    tmp_path, redis, world, models, kafka_server
):
    model = models[0]
    settings = _kafka_fed_settings(tmp_path, model, kafka_server, dlq=False)  # the DLQ topic does not exist yet
    good = _event(world, 1, 1, event_time=1.7e9)
    huge_bad = b'{"schema_version": 1, "junk": "' + b"x" * 900_000 + b'"}'
    producer = KafkaProducer(bootstrap_servers=kafka_server.bootstrap_servers, acks="all", max_request_size=2 << 20)
    try:
        producer.send(settings.items_topic, key=b"1", value=encode(good), partition=0).get(timeout=10)
        producer.send(settings.items_topic, key=b"bad", value=huge_bad, partition=0).get(timeout=10)
    finally:
        producer.close()
    indexer = Indexer(settings, redis=redis, metrics=IndexerMetrics())
    try:
        deadline = time.monotonic() + 30
        while indexer.metrics.registry.get_sample_value("hsnn_indexer_dead_letters_total") < 1:
            indexer.consume_once(timeout_ms=100)
            assert time.monotonic() < deadline
        indexer.consume_once(timeout_ms=50)  # survives the failing send; offsets are held back
        assert read_catalogue_offsets(redis, settings.items_topic, indexer.prefix) is None
        assert catalog_entry(redis, good.ad_id, indexer.prefix) is not None  # applied all the same
        assert indexer.metrics.registry.get_sample_value("hsnn_indexer_dead_letters_pending") == 1

        kafka_server.create_topics([settings.dlq_topic])
        deadline = time.monotonic() + 30
        while read_catalogue_offsets(redis, settings.items_topic, indexer.prefix) is None:
            indexer.consume_once(timeout_ms=50)
            assert time.monotonic() < deadline
        assert read_catalogue_offsets(redis, settings.items_topic, indexer.prefix) == {0: 2, 1: 0}
    finally:
        indexer.close()
    reader = KafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=kafka_server.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    letters = [read_dead_letter(r.value) for r in reader]
    reader.close()
    assert len(letters) >= 1  # at least once: a send that timed out may have landed too
    assert {(lt.offset, lt.raw_length, lt.raw_truncated) for lt in letters} == {(1, len(huge_bad), True)}
