"""Scale-out: N trainer ranks, each owning the impression partitions p with p % world_size == rank.

Why it is built this way (docs/trainer.md, "Several ranks"):

- **Gradients**: torch `DistributedDataParallel` (gloo on CPU, NCCL when CUDA is present) averages them.
  Each rank scales its loss by `rows * world_size / rows of the step over all ranks`, so the average is
  the gradient of the step's whole global batch, whatever each rank contributed.
- **Lockstep rounds**: every rank polls once, then all exchange one small vector (`plan_round`): batch
  sizes, stop wishes, snapshot due. All take the same number of steps; a rank short of data takes a
  zero-weight step (forward in eval mode on a batch it kept, loss x 0) so DDP's collectives always
  match and uneven partitions never deadlock.
- **State outside the gradient**: HSNN moves codebooks (k-means seeding, EMA, re-seeding), LTI running
  statistics and node means from the local batch, under `no_grad`. DDP does not see those, so after
  every step each tensor's fingerprint is compared across ranks and rank 0's copy is broadcast where
  they differ (`ReplicaSync`): the replicas stay identical; that state follows rank 0's shard.
- **Snapshots at a barrier**: when the round says so, every rank acknowledges its dead letters, the
  offsets of its partitions, held-out events and counters are gathered, the replicas' digests are
  compared, and rank 0 alone publishes one snapshot with every partition's offset. Offsets are committed
  only after that. A rank that dies takes the group with it (collectives fail, the launcher restarts
  all ranks) and every rank resumes from that one snapshot: exactly once per partition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hsnn.features import TrainingBatch
from hsnn.model import HSNN
from streaming.codec import decode_impression
from streaming.consumer import triage
from streaming.contracts import ImpressionEvent
from streaming.health import Heartbeat
from streaming.snapshots import Manifest
from streaming.tensors import impressions_to_batch
from trainer import group_codec
from trainer.bookkeeping import OffsetBook, is_held_out, truncate_lines
from trainer.guard import GuardedOptimizer, non_finite_tensors
from trainer.metrics import TrainerMetrics
from trainer.publisher import Publisher, PublishResult
from trainer.service import OnlineTrainer
from trainer.settings import TrainerSettings
from trainer.startup import load_or_create
from trainer.state import dump_trainer_state

log = logging.getLogger("hsnn.trainer")

RANKS_METRIC = "ranks"  # eval_metrics key: ranks that trained the snapshot
REPLICA_MISMATCH_METRIC = "replica_mismatches"  # eval_metrics key: tensors whose digest differed at the barrier
PARTITION_IDS_METRIC = "trained_ids_lines.p"  # + partition: lines of that partition's trained-ids file


def owns(partition: int, rank: int, world_size: int) -> bool:
    """The partition rule: disjoint, covers every partition, and needs no coordination."""
    return partition % world_size == rank


def partition_ids_path(base: str, partition: int) -> str:
    """A group writes one trained-ids file per partition: ownership moves with the world size, partitions do not."""
    return f"{base}.p{partition}"


class RankGroup:
    """This process's membership of the trainer group: the process group and a few typed collectives."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.rank = settings.rank
        self.world_size = settings.world_size
        backend = settings.dist_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        if backend == "nccl":  # code path for GPU machines; CI runs gloo only
            local = int(os.environ.get("LOCAL_RANK", self.rank % max(1, torch.cuda.device_count())))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                init_method=f"tcp://{settings.master_addr}:{settings.master_port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=settings.dist_timeout_s),
            )
        log.info("rank %d of %d joined (%s, %s)", self.rank, self.world_size, backend, self.device)

    def owns(self, partition: int) -> bool:
        return owns(partition, self.rank, self.world_size)

    def exchange(self, values: list[float]) -> Tensor:
        """(world_size, len(values)) float64: every rank's vector, the same on every rank."""
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return torch.stack(out).cpu()

    def all(self, flag: bool) -> bool:
        return bool(self.exchange([1.0 if flag else 0.0]).min() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, through `group_codec` (JSON + safetensors), not torch's pickling collectives."""
        mine = group_codec.to_tensor(group_codec.encode(obj), self.device)  # (bytes,) uint8
        lengths = self.exchange([float(len(mine))])[:, 0].long().tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        padded[: len(mine)] = mine
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [group_codec.decode(group_codec.from_tensor(t[:n])) for t, n in zip(out, lengths, strict=True)]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`src`'s `obj` on every rank, through `group_codec` (JSON + safetensors), never pickle."""
        blob = group_codec.encode(obj) if self.rank == src else b""
        length = torch.tensor([len(blob)], dtype=torch.int64, device=self.device)
        dist.broadcast(length, src=src)
        data = group_codec.to_tensor(blob, self.device) if self.rank == src else None
        if data is None:
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=src)
        return group_codec.decode(group_codec.from_tensor(data))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class FollowerLease:
    """Ranks other than 0 never write the store: rank 0 holds the lease for the group."""

    epoch = 0

    def acquire(self, wait_s: float = 0.0) -> int:
        return 0

    def renew(self, force: bool = False) -> None:
        return None

    def check(self) -> None:
        return None

    def release(self) -> None:
        return None


def to_device(obj: Any, device: torch.device) -> Any:
    """A batch (dataclasses, dicts, lists of tensors) on `device`; unchanged on CPU."""
    if device.type == "cpu":
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        )
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class ReplicaSync:
    """Keeps every rank's parameters and buffers identical: cheap fingerprints each step, a digest at snapshots."""

    def __init__(self, model: nn.Module) -> None:
        self.named = [*model.named_parameters(), *model.named_buffers()]
        largest = max((t.numel() for _, t in self.named), default=1)
        # Position weights: a plain sum misses counts and shares that moved between slots (their total is the batch).
        self.weights = torch.frac(torch.arange(largest, dtype=torch.float64) * 0.6180339887498949) + 0.5

    def fingerprints(self) -> Tensor:
        """Two float64 numbers per tensor: its sum and a position-weighted sum (computed where the tensor lives)."""
        parts: list[Tensor] = []
        for _, t in self.named:
            if self.weights.device != t.device:
                self.weights = self.weights.to(t.device)
            flat = t.detach().reshape(-1).to(torch.float64)
            parts.append(torch.stack([flat.sum(), torch.dot(flat, self.weights[: flat.numel()])]))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def repair(self, group: RankGroup) -> list[str]:
        """Broadcast rank 0's copy of every tensor whose fingerprint differs on some rank; returns their names."""
        mine = self.fingerprints().to(group.device)
        both = torch.cat([mine, -mine])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        n = len(mine)
        unequal = (both[:n] != -both[n:]).cpu().reshape(-1, 2).any(dim=1)  # max != min (NaN always differs)
        differ = torch.nonzero(unequal).flatten().tolist()
        with torch.no_grad():
            for i in differ:
                dist.broadcast(self.named[i][1].data, src=0)
        return [self.named[i][0] for i in differ]

    def digests(self) -> list[str]:
        """sha256 of each tensor's bytes: equal lists mean bit-identical replicas (-0.0 and 0.0 included)."""
        return [
            hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for _, t in self.named
        ]

    def broadcast(self, names: Iterable[str]) -> None:
        wanted = set(names)
        with torch.no_grad():
            for name, t in self.named:
                if name in wanted:
                    dist.broadcast(t.data, src=0)


@dataclass
class RoundPlan:
    """What every rank agreed on after a poll (identical on all ranks: computed from one all_gather)."""

    sizes: Tensor  # (world_size, max steps) rows each rank trains per step; 0: a zero-weight step
    stop: bool  # some rank wants to stop (SIGTERM): the group stops after this round
    all_stop: bool  # every rank wants to stop (benchmarks: every rank drained its partitions)
    snapshot_due: bool
    records: int  # records consumed this round over all ranks
    template_src: int | None  # rank that sends a batch to ranks that never had one (zero-weight steps need one)

    @property
    def steps(self) -> int:
        per_step = self.sizes.sum(dim=0)
        nonzero = torch.nonzero(per_step > 0).flatten()
        return int(nonzero[-1]) + 1 if len(nonzero) else 0

    def scale(self, rank: int, step: int) -> float:
        """Loss factor of `rank` at `step`: DDP's mean over ranks then equals the mean over the step's rows."""
        total = float(self.sizes[:, step].sum())
        return float(self.sizes[rank, step]) * self.sizes.shape[0] / total if total else 0.0


def plan_round(
    group: RankGroup,
    sizes: list[int],
    max_steps: int,
    *,
    want_stop: bool,
    since_snapshot: int,
    every_events: int,
    time_due: bool,
    has_template: bool,
    records: int,
) -> RoundPlan:
    """One all_gather of a small vector per round; every rank derives the same plan from it."""
    if len(sizes) > max_steps:
        raise ValueError(f"{len(sizes)} steps in one round, at most {max_steps}")
    vector = [float(s) for s in sizes] + [0.0] * (max_steps - len(sizes))
    vector += [float(want_stop), float(since_snapshot), float(time_due), float(has_template), float(records)]
    table = group.exchange(vector)
    step_sizes = table[:, :max_steps]
    stop_col, since_col, time_col, template_col, records_col = (table[:, max_steps + i] for i in range(5))
    plan = RoundPlan(
        sizes=step_sizes,
        stop=bool(stop_col.max() > 0),
        all_stop=bool(stop_col.min() > 0),
        snapshot_due=bool(since_col.sum() >= every_events) or bool(time_col.max() > 0),
        records=int(records_col.sum()),
        template_src=None,
    )
    if plan.steps and bool((template_col == 0).any()):
        havers = torch.nonzero(step_sizes[:, 0] > 0).flatten()
        plan.template_src = int(havers[0])
    return plan


def no_buffer_sync_before_forward() -> dict[str, bool]:
    """DDP's switch for "do not broadcast buffers before every forward" under its current name."""
    import inspect

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def ddp_step(
    ddp: DistributedDataParallel,
    model: HSNN,
    batch: TrainingBatch,
    optimizer: GuardedOptimizer,
    scale: float,
    real: bool,
) -> dict[str, float]:
    """`hsnn.training.train_step` for HSNN through the DDP wrapper, the loss scaled by `scale`.

    A zero-weight step (`real=False`) runs the forward in eval mode: the batch it replays must not move
    running statistics, reservoirs or node means. It still takes part in every collective and the optimizer
    step, so all ranks apply the same averaged gradient.
    """
    model.train(real)
    try:
        optimizer.zero_grad(set_to_none=True)
        losses = ddp(batch).losses
        (losses["total"] * scale).backward()
        optimizer.step()
        stats = {name: float(value.detach()) for name, value in losses.items()}
        model.step += 1
        stats["reseeded"] = float(model.index.after_step(int(model.step)))
    finally:
        model.train(True)
    return stats


class GroupTrainer(OnlineTrainer):
    """One rank of a trainer group (settings.world_size > 1). Build one per process; `run()` as usual."""

    def __init__(
        self,
        settings: TrainerSettings,
        registry: CollectorRegistry | None = None,
        publisher: Publisher | None = None,
        heartbeat: Heartbeat | None = None,
        metrics: TrainerMetrics | None = None,
        group: RankGroup | None = None,
    ):
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.group = group or RankGroup(settings)
        self._ids_files: dict[int, Any] = {}
        self._ids_lines_p: dict[int, int] = {}
        self._plan: RoundPlan | None = None
        self._template: TrainingBatch | None = None
        self.replica_repairs = 0  # tensors rank 0 had to re-broadcast (state changed outside the gradient)
        try:
            super().__init__(settings, registry, publisher, heartbeat, metrics)
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

    @property
    def rank(self) -> int:
        return self.group.rank

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
            if not self._pending:
                started = time.perf_counter()
                self._pending = self.kafka.poll_full(
                    self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms,
                    self.metrics.offset_out_of_range.inc,
                )
                self.timings.poll += time.perf_counter() - started
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
            if is_held_out(event.event_id, self.settings.holdout_one_in):
                self.eval_buffer.append((event, self.catalogue.live[event.ad_id]))
                self.metrics.events.labels("eval").inc()
            else:
                train.append((record.partition, event))
        self.timings.decode += time.perf_counter() - started
        started = time.perf_counter()
        chunks: list[list[tuple[int, ImpressionEvent]]] = []
        batches: list[TrainingBatch] = []
        size = self.settings.batch_size
        for start in range(0, len(train), size):
            chunk = train[start : start + size]
            try:
                batch = impressions_to_batch([e for _, e in chunk], self.schema, self.catalogue.live, checked=True)
            except ValueError as err:  # pre-checked per event, so a bug: dead-letter, do not crash
                log.exception("batch conversion failed; dead-lettering %d events", len(chunk))
                for _, event in chunk:
                    self.dead_letters.event(event, f"batch conversion failed: {err}")
                continue
            chunks.append(chunk)
            batches.append(to_device(batch, self.group.device))
        self.timings.batch += time.perf_counter() - started
        return chunks, batches

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
        self.metrics.grad_norm.set(self.optimizer.last_grad_norm)
        if chunk is None:
            return
        events = [e for _, e in chunk]
        if self.optimizer.skipped:  # the same decision on every rank: the gradient is the averaged one
            self.metrics.skipped_steps.inc()
            self.metrics.events.labels("skipped").inc(len(events))
            log.error("train step skipped: non-finite loss %s / gradient norm %s", stats.get("total"), stats)
            return
        if self.optimizer.clipped:
            self.metrics.clipped_steps.inc()
        self.metrics.loss.set(stats["total"])
        self.metrics.events.labels("trained").inc(len(events))
        self.trained_total += len(events)
        newest = max(e.event_time for e in events)
        self.watermark = newest if self.watermark is None else max(self.watermark, newest)
        self._observe_trained(events)
        if self._ids_files:
            by_partition: dict[int, list[str]] = {}
            for partition, event in chunk:
                by_partition.setdefault(partition, []).append(json.dumps(event.event_id) + "\n")
            for partition, lines in by_partition.items():
                handle = self._ids_files[partition]
                handle.write("".join(lines))
                handle.flush()
                self._ids_lines_p[partition] += len(lines)

    # ------------------------------------------------------------------ snapshots
    def snapshot_due(self) -> bool:
        return self._plan is not None and self._plan.snapshot_due

    def maybe_snapshot(self, force: bool = False) -> PublishResult | None:
        """The barrier: every rank calls it after the same round; rank 0 publishes for the group.

        Returns the result on every rank (rank 0's manifest, broadcast), or None when not due or postponed.
        """
        if not force and not self.snapshot_due():
            return None
        started = time.perf_counter()
        ready = self.flush_dead_letters()
        if not self._items_primed:
            try:
                self.catch_up_items()
            except KafkaError as err:
                log.warning("rank %d: items not caught up for the snapshot: %s", self.rank, err)
                ready = False
        if not self.group.all(ready):
            log.warning("snapshot postponed: some rank's dead letters are not acknowledged")
            return None
        for handle in self._ids_files.values():
            handle.flush()
            os.fsync(handle.fileno())  # durable *before* the snapshot that counts these lines
        topic = self.settings.impressions_topic
        digests = self.replicas.digests()
        share = {
            "offsets": self.offsets.topic(topic),
            "ids_lines": dict(self._ids_lines_p),
            "trained": self.trained_total,
            "watermark": self.watermark,
            "held_out": [] if self.rank == 0 else list(self.eval_buffer),
            "digests": digests,
        }
        shares = self.group.gather_objects(share)
        names = [name for name, _ in self.replicas.named]
        differ = sorted({names[i] for s in shares for i, d in enumerate(s["digests"]) if d != shares[0]["digests"][i]})
        mismatched = len(differ)
        if differ:  # the per-step fingerprints missed a difference: make the replicas identical before writing
            log.error("replicas differ at the barrier in %s: rank 0's copy is broadcast", differ[:10])
            self.replicas.broadcast(differ)
        if self.rank != 0:
            self.eval_buffer.clear()
        outcome: dict[str, Any] | None = None
        if self.rank == 0:
            outcome = self._publish_for_group(shares, mismatched)
        outcome = self.group.broadcast_object(outcome)
        if outcome.get("error"):
            raise RuntimeError(f"rank 0 could not publish the group's snapshot: {outcome['error']}")
        result: PublishResult = outcome["result"]
        self.manifest = result.manifest
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self.metrics.last_snapshot.set(result.manifest.created_at)
        self.timings.snapshot += time.perf_counter() - started
        self.commit_offsets()  # each rank its own partitions, only now that the snapshot is durable
        return result

    def _publish_for_group(self, shares: list[dict[str, Any]], mismatched: int) -> dict[str, Any]:
        """Rank 0: merge the ranks' shares and publish; the outcome (or the error) goes to every rank."""
        topic = self.settings.impressions_topic
        try:
            for share in shares[1:]:
                self.eval_buffer.extend(share["held_out"])
            book = OffsetBook.from_manifest(self.offsets.as_manifest())
            lines: dict[int, int] = {}
            for share in shares:
                for partition, offset in share["offsets"].items():
                    book.set(topic, int(partition), int(offset))
                lines.update(share["ids_lines"])
            watermarks = [s["watermark"] for s in shares if s["watermark"] is not None]
            self.watermark = max(watermarks) if watermarks else None
            trained_here = self.trained_total
            self.trained_total = sum(int(s["trained"]) for s in shares)
            poisoned = non_finite_tensors(self.model)
            if poisoned:
                self.metrics.non_finite_snapshots.inc()
                raise FloatingPointError(f"refusing to snapshot non-finite weights: {poisoned[:5]}")
            metrics = self.eval_metrics()
            self.trained_total = trained_here
            metrics[RANKS_METRIC] = float(self.group.world_size)
            metrics[REPLICA_MISMATCH_METRIC] = float(mismatched)
            for partition, count in lines.items():
                metrics[f"{PARTITION_IDS_METRIC}{partition}"] = float(count)
            self.lease.renew(force=True)
            result = self.publisher.publish(
                _cpu_view(self.model),
                offsets=book.as_manifest(),
                event_time_watermark=self.watermark,
                eval_metrics=metrics,
                extra_files=dump_trainer_state(self.optimizer.inner, self.eval_buffer),
            )
        except Exception as err:
            log.exception("rank 0: group snapshot failed")
            return {"error": f"{type(err).__name__}: {err}"}
        log.info(
            "group snapshot %d (%s): offsets %s, eval %s",
            result.manifest.version,
            "promoted" if result.promoted else "not promoted",
            result.manifest.offsets,
            result.manifest.eval_metrics,
        )
        return {"result": result}

    def eval_metrics(self) -> dict[str, float]:
        """As the single trainer's, with the eval batch on the group's device (rank 0 at the barrier)."""
        if self.group.device.type == "cpu":
            return super().eval_metrics()
        from hsnn.metrics import normalized_entropy
        from hsnn.training import predict

        metrics: dict[str, float] = {"events": float(len(self.eval_buffer))}
        clicks = sum(e.labels.click for e, _ in self.eval_buffer)
        if len(self.eval_buffer) >= self.settings.eval_min_events and 0 < clicks < len(self.eval_buffer):
            events = [e for e, _ in self.eval_buffer]
            items = {e.ad_id: f for e, f in self.eval_buffer}
            batch = to_device(impressions_to_batch(events, self.schema, items, checked=True), self.group.device)
            probs = predict(self.model, batch)
            metrics["ne"] = normalized_entropy(probs[:, 0].cpu(), batch.labels[:, 0].cpu())
            self.metrics.rolling_ne.set(metrics["ne"])
        metrics["trained_events_total"] = float(self.trained_total)
        return metrics

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


def _cpu_view(model: HSNN) -> HSNN:
    """The model as the store writes it (safetensors from CPU tensors); the model itself on CPU ranks."""
    if next(model.parameters()).device.type == "cpu":
        return model
    import copy

    return copy.deepcopy(model).cpu()


def dump_replica(model: nn.Module, directory: Path, rank: int) -> Path:
    """Debug (`replica_dump_dir`): this rank's parameters and buffers, to compare replicas from outside."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    path = directory / f"rank{rank}.safetensors"
    save_file(tensors, str(path))
    return path


__all__: Iterable[str] = ["GroupTrainer", "RankGroup", "owns", "plan_round"]
