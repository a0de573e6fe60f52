"""The online trainer against a real broker: exactly-once across SIGKILL, broker restarts, dead letters."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry
from trainer_support import (
    HOLDOUT,
    NUM_ADS,
    REPO,
    make_impression,
    make_item,
    make_topics,
    produce,
    produce_events,
    stream,
    trainer_env,
    trainer_settings,
    wait_until,
)

from devservers import KafkaServer
from hsnn.model import HSNN
from streaming.events import (
    ImpressionEvent,
    UserFeatures,
    encode,
    event_key,
    read_dead_letter,
)
from streaming.offsets import StoredOffsetOutOfRange
from streaming.snapshots import SnapshotStore
from trainer.bookkeeping import consumed_ids, is_held_out
from trainer.fencing import LeaseHeld
from trainer.service import OnlineTrainer
from trainer.settings import TrainerSettings
from worlds.planted import tiny_hsnn_config

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------ helpers
def _settings(kafka: KafkaServer, topics: dict[str, str], tmp: Path, **overrides: object) -> TrainerSettings:
    return trainer_settings(kafka, topics, tmp, "trainer-test", **overrides)


def _end_offsets(bootstrap: str, topic: str) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return {str(tp.partition): offset for tp, offset in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def _read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 20.0) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                got += [r.value for r in records]
        return got
    finally:
        consumer.close()


def _lines(path: str | Path) -> int:
    path = Path(path)
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _stream(
    kafka_server: KafkaServer, rows: range, prefix: str = "imp", partitions: int = 2
) -> tuple[dict[str, str], str, list[ImpressionEvent]]:
    """Fresh topics holding every ad's create and one impression per row: (topics, bootstrap, impressions)."""
    topics, events = stream(kafka_server, "trainer", rows, prefix, partitions)
    return topics, kafka_server.bootstrap_servers, events


def _drain(trainer: OnlineTrainer, topic: str, end: dict[str, int], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while {str(p): o for p, o in trainer.offsets.topic(topic).items()} != end:
        assert time.monotonic() < deadline, f"not drained: {trainer.offsets.topic(topic)} vs {end}"
        trainer.poll_once(timeout_ms=200)


def _expected_trained(events: list[ImpressionEvent]) -> set[str]:
    return {e.event_id for e in events if not is_held_out(e.event_id, HOLDOUT)}


# ------------------------------------------------------------------------------------------ tests
def test_end_to_end_snapshot_has_end_offsets_and_eval_metrics(kafka_server: KafkaServer, tmp_path: Path) -> None:
    topics, bootstrap, events = _stream(kafka_server, range(400))
    end = _end_offsets(bootstrap, topics["impressions"])

    registry = CollectorRegistry()
    notices = f"{topics['impressions']}-snapshots"
    kafka_server.create_topics([notices])
    settings = _settings(kafka_server, topics, tmp_path, snapshots_topic=notices)
    trainer = OnlineTrainer(settings, registry=registry)
    try:
        _drain(trainer, topics["impressions"], end)
        result = trainer.maybe_snapshot(force=True)
    finally:
        trainer.close()
    assert result is not None and result.promoted
    manifest = result.manifest
    # the promotion was announced on the notices topic
    reader = KafkaConsumer(notices, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    announced = [json.loads(record.value) for record in reader]
    reader.close()
    assert [(n["version"], n["created_at"]) for n in announced] == [(manifest.version, manifest.created_at)]
    assert manifest.offsets[topics["impressions"]] == end
    assert manifest.offsets[topics["items"]] == _end_offsets(bootstrap, topics["items"])
    held_out = len(events) - len(_expected_trained(events))
    assert held_out > 0
    assert manifest.eval_metrics["events"] == held_out
    assert 0 < manifest.eval_metrics["ne"] < 5
    assert manifest.event_time_watermark == max(e.event_time for e in events if not is_held_out(e.event_id, HOLDOUT))
    assert sorted(consumed_ids(settings.trained_ids_path)) == sorted(_expected_trained(events))
    sample = registry.get_sample_value
    assert sample("hsnn_trainer_events_total", {"outcome": "trained"}) == len(events) - held_out
    assert sample("hsnn_trainer_events_total", {"outcome": "eval"}) == held_out
    assert sample("hsnn_trainer_last_snapshot_timestamp_seconds") == manifest.created_at
    assert sample("hsnn_trainer_consumer_lag_messages", {"partition": "0"}) == 0

    # A restart resumes from the snapshot's offsets: nothing left to train, nothing trained twice.
    again = OnlineTrainer(settings, registry=CollectorRegistry())
    try:
        assert again.offsets.as_manifest() == manifest.offsets
        assert sum(again.poll_once(timeout_ms=500) for _ in range(3)) == 0
    finally:
        again.close()


def test_malformed_impressions_go_to_the_dlq_and_the_loop_survives(kafka_server: KafkaServer, tmp_path: Path) -> None:
    topics = make_topics(kafka_server, "trainer", partitions=1)
    bootstrap = kafka_server.bootstrap_servers
    produce_events(bootstrap, topics["items"], [make_item(ad) for ad in range(1, NUM_ADS + 1)])
    produce_events(bootstrap, topics["items"], [make_item(5, sequence=2, op="expire")])
    good = [make_impression(i, ad_id=1) for i in range(40)]
    wrong_dense = make_impression(1000).model_copy(update={"user": UserFeatures(dense=[1.0, 2.0, 3.0])})
    bad: list[tuple[bytes, bytes]] = [
        (b"bad-json", b'{"schema_version": 1, "event_id": '),
        (b"wrong-dense", encode(wrong_dense)),
        (b"unknown-ad", encode(make_impression(1001, ad_id=999))),
        (b"expired-ad", encode(make_impression(1002, ad_id=5))),
    ]
    records = [(event_key(e), encode(e)) for e in good[:20]] + bad + [(event_key(e), encode(e)) for e in good[20:]]
    produce(bootstrap, topics["impressions"], records)
    end = _end_offsets(bootstrap, topics["impressions"])

    registry = CollectorRegistry()
    trainer = OnlineTrainer(_settings(kafka_server, topics, tmp_path), registry=registry)
    try:
        _drain(trainer, topics["impressions"], end)
        result = trainer.maybe_snapshot(force=True)  # waits for the dead letters to be acknowledged
    finally:
        trainer.close()
    assert result is not None and result.manifest.offsets[topics["impressions"]] == end

    letters = {
        letter.key: letter for letter in map(read_dead_letter, _read_topic(bootstrap, topics["impressions_dlq"], 4))
    }
    assert set(letters) == {b"bad-json", b"wrong-dense", b"unknown-ad", b"expired-ad"}
    assert letters[b"bad-json"].reason.startswith("not JSON")
    assert letters[b"bad-json"].raw == bad[0][1] and letters[b"bad-json"].offset == 20
    assert "user.dense" in letters[b"wrong-dense"].reason
    assert letters[b"unknown-ad"].reason == "unknown ad 999"
    assert letters[b"expired-ad"].reason == "unknown ad 5 (expired)"
    sample = registry.get_sample_value
    assert sample("hsnn_trainer_dead_letters_total", {"reason": "malformed"}) == 1
    assert sample("hsnn_trainer_dead_letters_total", {"reason": "schema_mismatch"}) == 1
    assert sample("hsnn_trainer_dead_letters_total", {"reason": "unknown_ad"}) == 2
    assert sample("hsnn_trainer_events_total", {"outcome": "dead_letter"}) == 4
    trained = sample("hsnn_trainer_events_total", {"outcome": "trained"}) or 0.0
    assert trained + sample("hsnn_trainer_events_total", {"outcome": "eval"}) == len(good)


def test_sigkill_between_snapshots_then_restart_trains_every_event_once(
    kafka_server: KafkaServer, tmp_path: Path
) -> None:
    topics, bootstrap, first = _stream(kafka_server, range(600))
    settings = _settings(kafka_server, topics, tmp_path, snapshot_every_events=250)
    store = SnapshotStore(settings.store_dir)
    ids_path = settings.trained_ids_path
    assert ids_path is not None
    cmd = [sys.executable, "-m", "trainer"]

    # Run 1: snapshots every >= 250 records; killed once all 600 are trained, so the last ones
    # (after the newest snapshot) are trained but not in any snapshot.
    log1 = (tmp_path / "run1.log").open("w")
    run1 = subprocess.Popen(cmd, env=trainer_env(settings), cwd=REPO, stderr=log1)
    try:
        wait_until(lambda: _lines(ids_path) >= len(_expected_trained(first)), 300, "run 1 to train everything")
        wait_until(lambda: store.latest_version() is not None, 60, "a snapshot")
    finally:
        run1.send_signal(signal.SIGKILL)
        run1.wait(timeout=10)
        log1.close()
    killed_at = store.manifest(store.latest_version())
    assert sum(killed_at.offsets[topics["impressions"]].values()) < len(first), (tmp_path / "run1.log").read_text()[
        -2000:
    ]
    assert _lines(ids_path) > killed_at.eval_metrics["trained_ids_lines"]  # ids beyond the snapshot exist

    # Run 2: more events arrive; only SIGTERM snapshots (no timer, no event threshold).
    second = [make_impression(i) for i in range(600, 900)]
    produce_events(bootstrap, topics["impressions"], second)
    end = _end_offsets(bootstrap, topics["impressions"])
    versions_before = len(store.versions())
    log2 = (tmp_path / "run2.log").open("w")
    run2 = subprocess.Popen(cmd, env=trainer_env(settings, snapshot_every_events=10**9), cwd=REPO, stderr=log2)
    try:
        expected = _expected_trained(first + second)
        wait_until(lambda: _lines(ids_path) >= len(expected), 300, "run 2 to drain")
        run2.send_signal(signal.SIGTERM)
        run2.wait(timeout=60)
    finally:
        if run2.poll() is None:
            run2.kill()
        log2.close()
    assert run2.returncode == 0, (tmp_path / "run2.log").read_text()[-3000:]
    final = store.manifest(store.latest_version())
    assert len(store.versions()) == versions_before + 1  # the SIGTERM snapshot
    assert final.offsets[topics["impressions"]] == end
    ids = consumed_ids(ids_path)
    assert len(ids) == len(set(ids)) == len(expected)  # exactly once
    assert set(ids) == expected
    assert final.eval_metrics["trained_events_total"] == len(expected)


def test_broker_restart_mid_stream_loses_nothing(kafka_server: KafkaServer, tmp_path: Path) -> None:
    topics, bootstrap, first = _stream(kafka_server, range(300), prefix="br")
    settings = _settings(kafka_server, topics, tmp_path, snapshot_every_seconds=1.0)
    registry = CollectorRegistry()
    trainer = OnlineTrainer(settings, registry=registry)
    stop = threading.Event()
    worker = threading.Thread(target=trainer.run, args=(stop.is_set,), daemon=True)
    worker.start()
    ids_path = settings.trained_ids_path
    assert ids_path is not None
    try:
        wait_until(lambda: _lines(ids_path) >= len(_expected_trained(first)), 240, "the first batch to train")
        try:
            kafka_server.stop()
            time.sleep(2.0)  # the trainer polls (and snapshots nothing new) against a dead broker
        finally:
            kafka_server.start()
        second = [make_impression(i, prefix="br") for i in range(300, 600)]
        produce_events(bootstrap, topics["impressions"], second)
        expected = _expected_trained(first + second)
        wait_until(lambda: _lines(ids_path) >= len(expected), 300, "training after the restart")
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert trainer.shutdown(timeout=30)
    ids = consumed_ids(ids_path)
    assert len(ids) == len(set(ids)) and set(ids) == expected
    manifest = trainer.store.manifest(trainer.store.latest_version())
    assert manifest.offsets[topics["impressions"]] == _end_offsets(bootstrap, topics["impressions"])


def test_stored_offset_past_the_log_end_halts_instead_of_retraining(kafka_server: KafkaServer, tmp_path: Path) -> None:
    topics, bootstrap, events = _stream(kafka_server, range(40), prefix="oor")
    end = _end_offsets(bootstrap, topics["impressions"])
    settings = _settings(kafka_server, topics, tmp_path)
    # A snapshot from before the topic was recreated: partition 0 claims far more than the log holds.
    stored = {"0": end["0"] + 1000, "1": 0}
    SnapshotStore(settings.store_dir).write(HSNN(tiny_hsnn_config()), offsets={topics["impressions"]: stored})

    registry = CollectorRegistry()
    with pytest.raises(StoredOffsetOutOfRange, match="partition 0"):
        OnlineTrainer(settings, registry=registry)
    assert registry.get_sample_value("hsnn_trainer_offset_out_of_range_total") == 1
    assert not (Path(settings.store_dir) / "versions" / "000000000002").exists()

    # The operator's deliberate choice for one start: partition 0 from its log start.
    trainer = OnlineTrainer(settings.model_copy(update={"on_offset_out_of_range": "earliest"}))
    try:
        assert trainer.offsets.topic(topics["impressions"]) == {0: 0, 1: 0}
        _drain(trainer, topics["impressions"], end)
    finally:
        trainer.close()
    assert sorted(consumed_ids(settings.trained_ids_path)) == sorted(_expected_trained(events))


def test_a_second_trainer_on_the_same_store_refuses_to_start(kafka_server: KafkaServer, tmp_path: Path) -> None:
    topics = make_topics(kafka_server, "trainer")
    settings = _settings(kafka_server, topics, tmp_path, lease_wait_s=0.0)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "trainer"], env=trainer_env(settings), cwd=REPO, stderr=log)
    try:
        leases = Path(settings.store_dir) / "leases"
        wait_until(lambda: any(leases.glob("*.json")) if leases.exists() else False, 60, "the first trainer's lease")
        with pytest.raises(LeaseHeld, match=f"pid {first.pid}"):
            OnlineTrainer(settings, registry=CollectorRegistry())
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    second = OnlineTrainer(settings, registry=CollectorRegistry())  # released on a clean stop: no TTL wait
    try:
        assert second.lease.epoch == 2
    finally:
        second.close()


def test_a_900_kb_malformed_impression_is_dead_lettered_and_snapshots_keep_flowing(
    kafka_server: KafkaServer, tmp_path: Path
) -> None:
    topics = make_topics(kafka_server, "trainer", partitions=1)
    bootstrap = kafka_server.bootstrap_servers
    produce_events(bootstrap, topics["items"], [make_item(ad) for ad in range(1, NUM_ADS + 1)])
    huge = b'{"schema_version": 1, "event_id": "' + b"z" * 900_000 + b'"}'
    good = [make_impression(i, prefix="big") for i in range(30)]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 << 20)
    try:
        for event in good[:10]:
            producer.send(topics["impressions"], key=event_key(event), value=encode(event))
        producer.send(topics["impressions"], key=b"huge", value=huge).get(timeout=10)
        for event in good[10:]:
            producer.send(topics["impressions"], key=event_key(event), value=encode(event))
        producer.flush(timeout=30)
    finally:
        producer.close()
    end = _end_offsets(bootstrap, topics["impressions"])
    trainer = OnlineTrainer(_settings(kafka_server, topics, tmp_path), registry=CollectorRegistry())
    try:
        _drain(trainer, topics["impressions"], end)
        result = trainer.maybe_snapshot(force=True)
    finally:
        trainer.close()
    assert result is not None and result.manifest.offsets[topics["impressions"]] == end
    [letter] = map(read_dead_letter, _read_topic(bootstrap, topics["impressions_dlq"], 1))
    assert letter.key == b"huge" and letter.offset == 10
    assert letter.raw_truncated and letter.raw_length == len(huge) and letter.raw == huge[: len(letter.raw)]


def _weights(trainer: OnlineTrainer) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}


def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(kafka_server: KafkaServer, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    topics, bootstrap, events = _stream(kafka_server, range(8 * 64), prefix="exact", partitions=1)
    end = _end_offsets(bootstrap, topics["impressions"])
    common = {"batch_size": 64, "max_poll_records": 64, "snapshot_every_events": 3 * 64, "trained_ids_path": None}

    def run(name: str, polls: int | None, forget_optimiser: bool = False) -> OnlineTrainer:
        """Poll and snapshot as `run()` does, `polls` times (None: to the end); then drop it without a snapshot."""
        (tmp_path / name).mkdir(exist_ok=True)
        settings = _settings(kafka_server, topics, tmp_path / name, **common)
        trainer = OnlineTrainer(settings, registry=CollectorRegistry())
        if forget_optimiser:
            trainer.optimizer.inner.state.clear()
        done = 0
        while {str(p): o for p, o in trainer.offsets.topic(topics["impressions"]).items()} != end:
            if polls is not None and done == polls:
                break
            done += bool(trainer.poll_once(timeout_ms=500))
            trainer.maybe_snapshot()
        trainer.close()
        return trainer

    uninterrupted = _weights(run("uninterrupted", None))
    killed = run("killed", 5)  # a snapshot after 3 polls; 2 more polls trained, then lost with the process
    assert killed.store.versions() == [1]
    assert {"optimizer.safetensors", "trainer_state.json"} <= set(killed.store.manifest(1).files)
    shutil.copytree(tmp_path / "killed" / "store", tmp_path / "control" / "store")

    resumed = run("killed", None)
    held_out = [e for e in events if is_held_out(e.event_id, HOLDOUT)]
    assert [e.event_id for e, _ in resumed.eval_buffer] == [e.event_id for e in held_out]  # restored, then extended
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(_weights(resumed)[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # The same resume with a fresh optimiser ends elsewhere: what the saved Adam state buys.
    control = _weights(run("control", None, forget_optimiser=True))
    assert any(not torch.allclose(control[n], t, rtol=1e-5, atol=1e-6) for n, t in uninterrupted.items())
