"""Scale-out: N trainer ranks, each owning the impression partitions p with p % world_size == rank.

`GroupTrainer` is one rank: start-up (rank 0 picks the snapshot every rank loads), the lockstep round (poll,
agree, step) and the stop. Its pieces live in their own modules, each with its reason (docs/trainer.md,
"Several ranks"):

- trainer/rank_group.py: the partition rule and the process group's collectives (gloo on CPU, NCCL on CUDA).
- trainer/rounds.py: one small all_gather a round, equal step counts (zero-weight steps), DDP's loss scaling.
- trainer/replicas.py: HSNN state that moves outside the gradient is kept identical on every rank.
- trainer/group_snapshots.py: the snapshot barrier; rank 0 publishes one snapshot with every partition's offset.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from kafka.errors import KafkaError
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from hsnn.features import TrainingBatch
from hsnn.model import HSNN
from streaming.codec import decode_impression
from streaming.consumer import triage
from streaming.contracts import ImpressionEvent
from streaming.snapshots import Manifest
from trainer.bookkeeping import truncate_lines
from trainer.group_snapshots import GroupSnapshots
from trainer.rank_group import PARTITION_IDS_METRIC, FollowerLease, RankGroup, owns, partition_ids_path, to_device
from trainer.replicas import ReplicaSync, dump_replica
from trainer.rounds import RoundPlan, ddp_step, no_buffer_sync_before_forward, plan_round
from trainer.settings import TrainerSettings
from trainer.startup import load_or_create

log = logging.getLogger("hsnn.trainer")


class GroupTrainer(GroupSnapshots):
    """One rank of a trainer group (settings.world_size > 1). Build one per process; `run()` as usual."""

    def __init__(self, settings: TrainerSettings, *, group: RankGroup | None = None, **parts: Any) -> None:
        """`parts`: as the single trainer's (registry, publisher, heartbeat, metrics); `group`: one already joined."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.group = group or RankGroup(settings)
        self._ids_files: dict[int, Any] = {}
        self._ids_lines_p: dict[int, int] = {}
        self._plan: RoundPlan | None = None
        self._template: TrainingBatch | None = None
        self.replica_repairs = 0  # tensors rank 0 had to re-broadcast (state changed outside the gradient)
        try:
            super().__init__(settings, **parts)
        except BaseException:
            self.group.close()
            raise
        if self.group.device.type != "cpu":  # NCCL: the model and Adam's state (restored on CPU) on the GPU
            self.model.to(self.group.device)
            for state in self.optimizer.inner.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        state[key] = value.to(self.group.device)
        self.replicas = ReplicaSync(self.model)
        # DDP broadcasts rank 0's parameters and buffers once here; gradients are averaged in backward.
        # Every step repairs what HSNN changed outside the gradient (ReplicaSync), so buffers need no
        # broadcast before each forward. Parameters a step leaves unused (eval-mode zero-weight steps,
        # frozen codebooks) are allowed.
        self.ddp = DistributedDataParallel(
            self.model,
            device_ids=[self.group.device.index] if self.group.device.type == "cuda" else None,
            find_unused_parameters=True,
            **no_buffer_sync_before_forward(),
        )
        self.replicas.repair(self.group)  # identical from the first step, whatever DDP's start-up sync covers
        self.max_steps = -(-settings.max_poll_records // settings.batch_size)

    # ------------------------------------------------------------------ start-up
    def _make_lease(self) -> Any:
        return super()._make_lease() if self.rank == 0 else FollowerLease()

    def _tidy_store(self) -> None:
        if self.rank == 0:
            super()._tidy_store()

    def _load(self) -> tuple[HSNN, Manifest | None, dict[str, bytes]]:
        """Rank 0 picks the newest snapshot that verifies; every rank loads that very one (weights and Adam)."""
        if self.rank == 0:
            model, manifest, files = load_or_create(self.store, self.settings.hsnn_config)
            self.group.broadcast_object(manifest.version if manifest else None)
            return model, manifest, files
        version = self.group.broadcast_object(None)
        if version is None:
            return HSNN(self.settings.hsnn_config()), None, {}
        model, manifest, files = self.store.load_with_files(version)
        assert isinstance(model, HSNN)
        return model, manifest, files

    def _single_ids_file(self) -> bool:
        return False

    def _assign_partitions(self) -> None:
        """This rank's partitions only; a halt on one rank (offset outside the log) halts every rank."""
        if self.rank != 0:
            self.trained_total = 0  # the snapshot's total is the group's: counted once, by rank 0
            self.eval_buffer.clear()  # rank 0 keeps the group's eval buffer; others send theirs at each barrier
        failure: Exception | None = None
        try:
            stored = self.kafka.assign(self.offsets, owns=self.group.owns)
            self.kafka.enforce_stored_offsets(stored, self.offsets, self.metrics.offset_out_of_range.inc)
        except Exception as err:
            failure = err
        if not self.group.all(failure is None):
            from streaming.offsets import StoredOffsetOutOfRange

            raise failure or StoredOffsetOutOfRange("another rank of the group halted at start-up")
        topic = self.settings.impressions_topic
        mine = {tp.partition for tp in self.kafka.impression_tps}
        for partition in list(self.offsets.topic(topic)):
            if partition not in mine:
                self.offsets.forget(topic, partition)  # another rank reports it at the barrier
        base = self.settings.trained_ids_path
        if base:
            lines = self.manifest.eval_metrics if self.manifest else {}
            for partition in sorted(mine):
                path = partition_ids_path(base, partition)
                keep = int(lines.get(f"{PARTITION_IDS_METRIC}{partition}") or 0)
                self._ids_lines_p[partition] = truncate_lines(path, keep)
                self._ids_files[partition] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives with us)
        log.info("rank %d owns partitions %s of %s", self.rank, sorted(mine), topic)

    # ------------------------------------------------------------------ a round
    def poll_once(self, timeout_ms: int | None = None, want_stop: bool = False) -> int:
        """Poll this rank's partitions, agree with the group, take the agreed steps; returns local records.

        Never raises a Kafka error (the other ranks would wait in the next collective): the polled records
        are kept for the next round, and this rank joins the round with nothing to train.
        """
        records: list[Any] = []
        try:
            self._poll_pending(timeout_ms)
            if self._pending or not self._items_primed:
                self.catch_up_items()
            records, self._pending = self._pending, []
        except KafkaError as err:
            self.metrics.kafka_errors.inc()
            log.warning("rank %d: Kafka error, this round trains nothing here: %s", self.rank, err)
        chunks, batches = self._route(records)
        agree_started = time.perf_counter()
        plan = plan_round(
            self.group,
            [len(c) for c in chunks],
            self.max_steps,
            want_stop=want_stop,
            since_snapshot=self._since_snapshot + len(records),
            every_events=self.settings.snapshot_every_events,
            time_due=self._time_due(len(records)),
            has_template=self._template is not None or bool(batches),
            records=len(records),
        )
        self._plan = plan
        if plan.template_src is not None:
            template = self.group.broadcast_object(
                batches[0] if self.rank == plan.template_src else None, src=plan.template_src
            )
            if self._template is None and not batches:
                self._template = to_device(template, self.group.device)
        self._add_time("agree", time.perf_counter() - agree_started)  # includes waiting for the slowest rank
        for step in range(plan.steps):
            chunk = chunks[step] if step < len(chunks) else None
            batch = batches[step] if step < len(batches) else None
            self._step(chunk, batch, plan.scale(self.rank, step))
        for record in records:
            self.offsets.advance(record.topic, record.partition, record.offset)
        self._consumed += len(records)
        self._since_snapshot += len(records)
        self.dead_letters.send()
        self._update_lag()
        return len(records)

    def _add_time(self, name: str, seconds: float) -> None:
        self.timings.extra[name] = self.timings.extra.get(name, 0.0) + seconds

    def _time_due(self, records: int) -> bool:
        return (self._since_snapshot + records) > 0 and (
            time.monotonic() - self._last_snapshot_at >= self.settings.snapshot_every_seconds
        )

    def _route(self, records: list[Any]) -> tuple[list[list[tuple[int, ImpressionEvent]]], list[TrainingBatch]]:
        """Triage (dead letters, held out) and cut the training share into batches: (partition, event) chunks."""
        started = time.perf_counter()
        train: list[tuple[int, ImpressionEvent]] = []
        for record, event in triage(records, decode_impression, self._reject, self.dead_letters):
            if not self._held_out(event):
                train.append((record.partition, event))
        self.timings.decode += time.perf_counter() - started
        started = time.perf_counter()
        chunks: list[list[tuple[int, ImpressionEvent]]] = []
        batches: list[TrainingBatch] = []
        size = self.settings.batch_size
        for start in range(0, len(train), size):
            chunk = train[start : start + size]
            batch = self._to_batch([e for _, e in chunk])
            if batch is not None:
                chunks.append(chunk)
                batches.append(batch)
        self.timings.batch += time.perf_counter() - started
        return chunks, batches

    def _on_device(self, batch: TrainingBatch) -> TrainingBatch:
        return to_device(batch, self.group.device)

    def _step(self, chunk: list[tuple[int, ImpressionEvent]] | None, batch: TrainingBatch | None, scale: float) -> None:
        real = batch is not None
        if batch is not None:
            self._template = batch
        assert self._template is not None, "a zero-weight step without a batch to replay"
        started = time.perf_counter()
        self.optimizer.arm()
        stats = ddp_step(self.ddp, self.model, self._template, self.optimizer, scale, real)
        stepped = time.perf_counter()
        repaired = self.replicas.repair(self.group)
        self.replica_repairs += len(repaired)
        self.timings.train += stepped - started  # forward, backward with DDP's allreduce, optimizer
        self._add_time("repair", time.perf_counter() - stepped)
        self._add_time("zero_weight_steps" if batch is None else "real_steps", 1.0)
        if chunk is None:
            self.metrics.grad_norm.set(self.optimizer.last_grad_norm)
            return
        # A skipped step is the same decision on every rank: the gradient it judged is the averaged one.
        if not self._account_step([e for _, e in chunk], stats) or not self._ids_files:
            return
        by_partition: dict[int, list[str]] = {}
        for partition, event in chunk:
            by_partition.setdefault(partition, []).append(json.dumps(event.event_id) + "\n")
        for partition, lines in by_partition.items():
            handle = self._ids_files[partition]
            handle.write("".join(lines))
            handle.flush()
            self._ids_lines_p[partition] += len(lines)

    # ------------------------------------------------------------------ loop and stop
    def run(self, should_stop: Any, max_idle_polls: int | None = None, all_must_stop: bool = False) -> None:
        """Rounds until the group agrees to stop: any rank's `should_stop()` (a signal), or every rank's with
        `all_must_stop` (benchmarks: each rank drained its partitions). `max_idle_polls`: after that many
        rounds in a row in which no rank consumed anything."""
        idle = 0
        while True:
            self.heartbeat.beat()
            self.lease.renew()
            self.poll_once(want_stop=bool(should_stop()))
            plan = self._plan
            assert plan is not None
            if plan.all_stop or (plan.stop and not all_must_stop):
                return
            self.maybe_snapshot()
            idle = 0 if plan.records else idle + 1
            if max_idle_polls is not None and idle >= max_idle_polls:
                return

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Final snapshot at a barrier (every rank calls this after the same round), dump replicas, close."""
        ok = False
        deadline = time.monotonic() + timeout
        try:
            while True:
                ok = self.maybe_snapshot(force=True) is not None
                if ok or not self.group.all(time.monotonic() < deadline):  # every rank decides the same
                    break
                time.sleep(0.5)
        finally:
            if ok and self.settings.replica_dump_dir:
                dump_replica(self.model, Path(self.settings.replica_dump_dir), self.rank)
            self.close()
        return ok

    def close(self) -> None:
        super().close()
        for handle in self._ids_files.values():
            handle.close()
        self._ids_files.clear()
        self.group.close()


__all__: Iterable[str] = ["GroupTrainer", "RankGroup", "RoundPlan", "owns", "partition_ids_path", "plan_round"]
