"""The snapshot barrier of a trainer group: the ranks meet, and rank 0 alone publishes one snapshot for all.

When the round says so, every rank acknowledges its dead letters; the offsets of its partitions, its held-out
events and counters are gathered; the replicas' digests are compared (and repaired from rank 0 if they differ);
rank 0 publishes one snapshot carrying every partition's offset, and only then does each rank commit its
offsets. A rank that dies takes the group with it, and every rank resumes from that one snapshot: exactly once
per partition. The round itself lives in trainer/distributed.py (`GroupTrainer`), which builds on this class.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from kafka.errors import KafkaError

from hsnn.model import HSNN
from trainer.bookkeeping import OffsetBook
from trainer.guard import refuse_non_finite
from trainer.publisher import PublishResult
from trainer.rank_group import PARTITION_IDS_METRIC, RANKS_METRIC, REPLICA_MISMATCH_METRIC, RankGroup
from trainer.replicas import ReplicaSync
from trainer.rounds import RoundPlan
from trainer.service import OnlineTrainer
from trainer.state import dump_trainer_state

log = logging.getLogger("hsnn.trainer")


class GroupSnapshots(OnlineTrainer):
    """The barrier half of `GroupTrainer`: snapshots taken by the whole group, published by rank 0."""

    group: RankGroup
    replicas: ReplicaSync
    _plan: RoundPlan | None
    _ids_files: dict[int, Any]
    _ids_lines_p: dict[int, int]

    @property
    def rank(self) -> int:
        return self.group.rank

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
            refuse_non_finite(self.model, self.metrics.non_finite_snapshots.inc)
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


def _cpu_view(model: HSNN) -> HSNN:
    """The model as the store writes it (safetensors from CPU tensors); the model itself on CPU ranks."""
    if next(model.parameters()).device.type == "cpu":
        return model
    import copy

    return copy.deepcopy(model).cpu()
