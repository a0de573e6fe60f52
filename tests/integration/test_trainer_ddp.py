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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import trainer_support as support
from kafka import KafkaConsumer, TopicPartition
from safetensors.torch import load_file

from devservers import KafkaServer
from streaming.events import ImpressionEvent, decode_impression
from streaming.snapshots import SnapshotStore
from trainer.bookkeeping import consumed_ids, is_held_out
from trainer.rank_group import partition_ids_path
from trainer.settings import TrainerSettings

pytestmark = pytest.mark.integration


def _stream(kafka: KafkaServer, rows: range) -> tuple[dict[str, str], list[ImpressionEvent]]:
    return support.stream(kafka, "ddp", rows, "ddp")


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
    values: dict[str, object] = {"batch_size": 64, "max_poll_records": 64, "torch_threads": 1}
    values.update(lease_ttl_s=5.0, dist_timeout_s=60.0, **overrides)
    return support.trainer_settings(kafka, topics, tmp, "ddp-test", **values)


def _env(settings: TrainerSettings) -> dict[str, str]:
    """The group's environment: no torch rendezvous variables of our own, and the launcher's --ranks wins."""
    env = support.trainer_env(settings)
    # HSNN_TRAINER_MASTER_PORT too: the launcher then picks a free port, so parallel runs never collide
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HSNN_TRAINER_RANKS", "HSNN_TRAINER_MASTER_PORT"):
        env.pop(name, None)
    return env


def _expected(rows: list[tuple[int, str]]) -> list[str]:
    return [event_id for _, event_id in rows if not is_held_out(event_id, support.HOLDOUT)]


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
            [sys.executable, "-m", "trainer", "--ranks", "2"], env=_env(settings), cwd=support.REPO, stderr=handle
        )
    finally:
        handle.close()  # the child keeps its own descriptor


@contextmanager
def _group(settings: TrainerSettings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The launched group; killed on the way out unless the test stopped it."""
    launcher = _launch(settings, log)
    try:
        yield launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _wait_trained(base: str, rows: dict[int, list[tuple[int, str]]], what: str, log: Path) -> None:
    """Until every partition's trained-ids file has each of its rows that is not held out."""
    support.wait_until(lambda: all(len(_trained(base, p)) >= len(_expected(rows[p])) for p in rows), 50, what, log)


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
    with _group(settings, log) as launcher:
        _wait_trained(base, rows, "both ranks to train", log)
        _stop(launcher, log)

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
    with _group(settings, log) as launcher:
        # Everything trained, snapshots every >= 200 events: the newest events are in no snapshot yet.
        _wait_trained(base, first, "run 1", log)
        support.wait_until(lambda: store.latest_version() is not None, 20, "a snapshot", log)
        killed_at = store.manifest(store.latest_version())
        pid = _rank_pid(launcher, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert sum(killed_at.offsets[topics["impressions"]].values()) < 600
        trained_before = {p: len(_trained(base, p)) for p in first}
        assert sum(trained_before.values()) > killed_at.eval_metrics["trained_events_total"]

        support.produce_events(
            bootstrap, topics["impressions"], [support.make_impression(i, prefix="ddp") for i in range(600, 900)]
        )
        rows = _by_partition(bootstrap, topics["impressions"])
        support.wait_until(
            lambda: "restarting the group" in log.read_text(), 30, "the launcher to restart the group", log
        )
        _wait_trained(base, rows, "the restarted group", log)
        _stop(launcher, log)

    final = store.manifest(store.latest_version())
    assert final.offsets[topics["impressions"]] == {str(p): len(r) for p, r in rows.items()}
    for partition, partition_rows in rows.items():
        ids = _trained(base, partition)
        assert ids == _expected(partition_rows)  # every offset's event once, in offset order: none twice, none lost
    assert final.eval_metrics["trained_events_total"] == sum(len(_expected(r)) for r in rows.values())
    assert final.eval_metrics["ranks"] == 2 and final.eval_metrics["replica_mismatches"] == 0
