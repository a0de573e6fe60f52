"""Two trainer ranks (gloo, two processes, `python -m trainer --ranks 2`) against a real broker.

One snapshot carries both partitions' offsets and both replicas are identical; a rank SIGKILLed mid-stream
takes the group down, the launcher restarts it from the last snapshot, and every event of every partition is
trained exactly once (counted by offset).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from safetensors.torch import load_file

from devservers import KafkaServer
from streaming.events import (
    Engagement,
    ImpressionEvent,
    ItemEvent,
    ItemFeatures,
    Labels,
    UserFeatures,
    decode_impression,
    encode,
    event_key,
)
from streaming.snapshots import SnapshotStore
from trainer.bookkeeping import consumed_ids, is_held_out
from trainer.rank_group import partition_ids_path
from trainer.settings import TrainerSettings
from worlds.planted import tiny_hsnn_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOLDOUT = 20
NUM_ADS = 30


def _item(ad_id: int) -> ItemEvent:
    features = ItemFeatures(
        dense=[ad_id % 3, 0.5, -0.25, 1.0], sparse={"advertiser": ad_id % 7 + 1, "category": ad_id % 5 + 1}
    )
    return ItemEvent(op="create", ad_id=ad_id, event_time=1_767_225_000.0, sequence=1, features=features)


def _impression(i: int) -> ImpressionEvent:
    ad = i % NUM_ADS + 1
    click = int(i % 3 == 0)
    return ImpressionEvent(
        event_id=f"ddp-{i}",
        event_time=1_767_225_600.0 + i,
        user=UserFeatures(
            dense=[0.1 * (i % 10), -0.5],
            sparse={"segment": [i % 6 + 1], "age_bucket": [i % 4 + 1]},
            history=[
                Engagement(attributes={"item_id": ad, "advertiser": ad % 7 + 1, "category": ad % 5 + 1}, age_hours=3.0)
            ],
        ),
        ad_id=ad,
        labels=Labels(click=click, conversion=click * int(i % 2 == 0)),
    )


def _produce(bootstrap: str, topic: str, events: list[ImpressionEvent] | list[ItemEvent]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_block_ms=20_000)
    try:
        futures = [producer.send(topic, key=event_key(e), value=encode(e)) for e in events]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=10)
    finally:
        producer.close()


def _stream(kafka: KafkaServer, rows: range) -> tuple[dict[str, str], list[ImpressionEvent]]:
    tag = uuid.uuid4().hex[:8]
    topics = {
        "impressions": f"ddp-imp-{tag}",
        "items": f"ddp-items-{tag}",
        "impressions_dlq": f"ddp-imp-dlq-{tag}",
        "items_dlq": f"ddp-items-dlq-{tag}",
    }
    kafka.create_topics([topics["impressions"], topics["impressions_dlq"], topics["items_dlq"]], partitions=2)
    kafka.create_topics([topics["items"]], partitions=2, compacted=[topics["items"]])
    _produce(kafka.bootstrap_servers, topics["items"], [_item(ad) for ad in range(1, NUM_ADS + 1)])
    events = [_impression(i) for i in rows]
    _produce(kafka.bootstrap_servers, topics["impressions"], events)
    return topics, events


def _by_partition(bootstrap: str, topic: str) -> dict[int, list[tuple[int, str]]]:
    """partition -> [(offset, event id)] of every record in the topic, read back from the broker."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        end = consumer.end_offsets(tps)
        out: dict[int, list[tuple[int, str]]] = {tp.partition: [] for tp in tps}
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                for r in records:
                    out[r.partition].append((r.offset, decode_impression(r.value).event_id))
        return out
    finally:
        consumer.close()


def _settings(kafka: KafkaServer, topics: dict[str, str], tmp: Path, **overrides: object) -> TrainerSettings:
    config = tmp / "hsnn.json"
    config.write_text(tiny_hsnn_config().model_dump_json())
    values: dict[str, object] = {
        "kafka_bootstrap_servers": kafka.bootstrap_servers,
        "group_id": f"ddp-test-{uuid.uuid4().hex[:6]}",
        "impressions_topic": topics["impressions"],
        "items_topic": topics["items"],
        "impressions_dlq_topic": topics["impressions_dlq"],
        "items_dlq_topic": topics["items_dlq"],
        "store_dir": str(tmp / "store"),
        "model_config_path": str(config),
        "batch_size": 64,
        "max_poll_records": 64,
        "eval_min_events": 5,
        "holdout_one_in": HOLDOUT,
        "metrics_port": 0,
        "trained_ids_path": str(tmp / "trained-ids.txt"),
        "snapshot_every_seconds": 600.0,
        "snapshot_every_events": 10**9,
        "torch_threads": 1,
        "lease_ttl_s": 5.0,
        "dist_timeout_s": 60.0,
    }
    values.update(overrides)
    return TrainerSettings(**values)


def _env(settings: TrainerSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"HSNN_TRAINER_{name.upper()}"] = str(value)
    env.pop("HSNN_TRAINER_RANKS", None)
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait(condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(0.1)


def _expected(rows: list[tuple[int, str]]) -> list[str]:
    return [event_id for _, event_id in rows if not is_held_out(event_id, HOLDOUT)]


def _trained(base: str, partition: int) -> list[str]:
    path = Path(partition_ids_path(base, partition))
    return consumed_ids(path) if path.exists() else []


def _rank_pid(launcher: subprocess.Popen[bytes], rank: int) -> int | None:
    """The pid of the launcher's child that runs `rank` (read from its environment)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def _launch(settings: TrainerSettings, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("w")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer", "--ranks", "2"], env=_env(settings), cwd=REPO, stderr=handle
        )
    finally:
        handle.close()  # the child keeps its own descriptor


def _stop(launcher: subprocess.Popen[bytes], log: Path) -> None:
    launcher.send_signal(signal.SIGTERM)
    try:
        code = launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert code == 0, log.read_text()[-4000:]


def test_two_ranks_one_snapshot_holds_both_partitions_and_identical_replicas(
    kafka_server: KafkaServer, tmp_path: Path
) -> None:
    topics, _ = _stream(kafka_server, range(400))
    settings = _settings(kafka_server, topics, tmp_path, replica_dump_dir=str(tmp_path / "replicas"))
    rows = _by_partition(kafka_server.bootstrap_servers, topics["impressions"])
    assert set(rows) == {0, 1} and all(rows.values())  # both partitions hold events
    base = settings.trained_ids_path
    assert base is not None
    log = tmp_path / "group.log"
    launcher = _launch(settings, log)
    try:
        _wait(
            lambda: all(len(_trained(base, p)) >= len(_expected(rows[p])) for p in rows), 50, "both ranks to train", log
        )
        _stop(launcher, log)
    finally:
        if launcher.poll() is None:
            launcher.kill()

    store = SnapshotStore(settings.store_dir)
    assert store.versions() == [1]  # the final snapshot, written once, by rank 0
    manifest = store.manifest(1)
    assert manifest.offsets[topics["impressions"]] == {str(p): len(r) for p, r in rows.items()}
    assert manifest.eval_metrics["ranks"] == 2
    assert manifest.eval_metrics["replica_mismatches"] == 0
    for partition, partition_rows in rows.items():  # each partition trained by its rank, each event once
        assert _trained(base, partition) == _expected(partition_rows)
    total = sum(len(_expected(r)) for r in rows.values())
    assert manifest.eval_metrics["trained_events_total"] == total
    assert manifest.eval_metrics["events"] == sum(len(r) for r in rows.values()) - total  # both ranks' held out

    # The replicas are bit-identical, and the snapshot holds those weights.
    rank0 = load_file(str(tmp_path / "replicas" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "replicas" / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), [
        k for k in rank0 if not torch.equal(rank0[k], rank1[k])
    ]
    model, _ = store.load(1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, rank0[name]), name
    assert int(rank0["step"]) > 0


def test_a_killed_rank_restarts_the_group_and_each_partition_trains_every_event_once(
    kafka_server: KafkaServer, tmp_path: Path
) -> None:
    topics, _ = _stream(kafka_server, range(600))
    settings = _settings(kafka_server, topics, tmp_path, snapshot_every_events=200)
    bootstrap = kafka_server.bootstrap_servers
    store = SnapshotStore(settings.store_dir)
    base = settings.trained_ids_path
    assert base is not None
    first = _by_partition(bootstrap, topics["impressions"])
    log = tmp_path / "group.log"
    launcher = _launch(settings, log)
    try:
        # Everything trained, snapshots every >= 200 events: the newest events are in no snapshot yet.
        _wait(lambda: all(len(_trained(base, p)) >= len(_expected(first[p])) for p in first), 50, "run 1", log)
        _wait(lambda: store.latest_version() is not None, 20, "a snapshot", log)
        killed_at = store.manifest(store.latest_version())
        pid = _rank_pid(launcher, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert sum(killed_at.offsets[topics["impressions"]].values()) < 600
        trained_before = {p: len(_trained(base, p)) for p in first}
        assert sum(trained_before.values()) > killed_at.eval_metrics["trained_events_total"]

        _produce(bootstrap, topics["impressions"], [_impression(i) for i in range(600, 900)])
        rows = _by_partition(bootstrap, topics["impressions"])
        _wait(lambda: "restarting the group" in log.read_text(), 30, "the launcher to restart the group", log)
        _wait(
            lambda: all(len(_trained(base, p)) >= len(_expected(rows[p])) for p in rows), 50, "the restarted group", log
        )
        _stop(launcher, log)
    finally:
        if launcher.poll() is None:
            launcher.kill()

    final = store.manifest(store.latest_version())
    assert final.offsets[topics["impressions"]] == {str(p): len(r) for p, r in rows.items()}
    for partition, partition_rows in rows.items():
        ids = _trained(base, partition)
        assert ids == _expected(partition_rows)  # every offset's event once, in offset order: none twice, none lost
    assert final.eval_metrics["trained_events_total"] == sum(len(_expected(r)) for r in rows.values())
    assert final.eval_metrics["ranks"] == 2 and final.eval_metrics["replica_mismatches"] == 0
