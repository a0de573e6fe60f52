"""The online trainer: impressions from Kafka -> HSNN train steps -> versioned snapshots.

One loop, one thread. Each `poll_once()` takes a batch of impression records, makes sure the
item catalogue has read the items topic up to its end, routes every record (train, held-out
eval, dead letter), trains on the training share and advances the offsets. `maybe_snapshot()`
runs only between polls, so the offsets written into a snapshot manifest always describe
exactly the records whose effect is in the weights. That is the exactly-once argument; see
docs/trainer.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from hsnn.features import TrainingBatch
from hsnn.metrics import normalized_entropy
from hsnn.model import HSNN
from hsnn.training import make_optimizer, predict, train_step
from streaming.codec import MalformedEvent, decode_impression, decode_item
from streaming.consumer import triage
from streaming.contracts import ImpressionEvent, ItemFeatures
from streaming.health import Heartbeat
from streaming.offsets import StoredOffsetOutOfRange
from streaming.snapshots import Manifest, SnapshotStore
from streaming.tensors import impressions_to_batch
from streaming.validation import impression_problems
from trainer.bookkeeping import OffsetBook, is_held_out, truncate_lines
from trainer.catalogue import Catalogue
from trainer.dead_letters import TrainerDeadLetters
from trainer.fencing import TrainerLease
from trainer.guard import GuardedOptimizer, refuse_non_finite
from trainer.kafka_io import TrainerKafka
from trainer.loop import final_snapshot, run_loop
from trainer.metrics import Timings, TrainerMetrics, observe_many
from trainer.publisher import Publisher, PublisherMetrics, PublisherSettings, PublishResult, notice_sender
from trainer.settings import TrainerSettings
from trainer.startup import compile_overarches, load_or_create, remove_unfinished_snapshots
from trainer.state import dump_trainer_state, restore_into

log = logging.getLogger("hsnn.trainer")

TRAINED_IDS_METRIC = "trained_ids_lines"  # eval_metrics key: lines of the trained-ids file this snapshot covers
TRAINED_TOTAL_METRIC = "trained_events_total"  # eval_metrics key: events trained over the snapshot lineage


class OnlineTrainer:
    """Online HSNN trainer. Build it, then call `run()`, or drive `poll_once()` / `maybe_snapshot()` yourself."""

    def __init__(
        self,
        settings: TrainerSettings,
        registry: CollectorRegistry | None = None,
        publisher: Publisher | None = None,
        heartbeat: Heartbeat | None = None,
        metrics: TrainerMetrics | None = None,
    ):
        self.settings = settings
        self.metrics = metrics or TrainerMetrics(registry)
        self.heartbeat = heartbeat or Heartbeat(settings.heartbeat_max_age_s)
        self.publisher = publisher or Publisher(
            PublisherSettings(
                store_dir=settings.store_dir,
                keep_versions=settings.keep_versions,
                max_ne_regression=settings.max_ne_regression,
            ),
            metrics=PublisherMetrics(registry),  # same registry: /metrics shows the hsnn_publisher_* series too
        )
        self.store: SnapshotStore = self.publisher.store
        self.timings = Timings()
        torch.manual_seed(settings.seed)
        # Fencing first: only the lease holder may read the newest snapshot as its starting point.
        self.lease = self._make_lease()
        self.metrics.lease_epoch.set(self.lease.acquire(wait_s=settings.lease_wait_s))
        self._tidy_store()

        self.model, self.manifest, snapshot_files = self._load()
        if settings.compile_overarch:
            compile_overarches(self.model)
        self.schema = self.model.config.features
        self.optimizer = GuardedOptimizer(self.model, make_optimizer(self.model, settings.lr), settings.max_grad_norm)
        self.offsets = OffsetBook.from_manifest(self.manifest.offsets if self.manifest else {})
        self.watermark: float | None = self.manifest.event_time_watermark if self.manifest else None
        self.clock = time.time  # wall clock of the freshness metrics (epoch s; tests replace it)
        if self.watermark is not None:
            self.metrics.trained_event_time.set(self.watermark)
        metrics = self.manifest.eval_metrics if self.manifest else {}
        self.trained_total = int(metrics.get(TRAINED_TOTAL_METRIC, 0))
        self.catalogue = Catalogue()
        self.eval_buffer: deque[tuple[ImpressionEvent, ItemFeatures]] = deque(maxlen=settings.eval_buffer_size)
        restore_into(self.optimizer.inner, self.eval_buffer, snapshot_files, self.manifest)

        self._ids_file = None
        self._ids_lines = 0
        if settings.trained_ids_path and self._single_ids_file():
            self._ids_lines = truncate_lines(settings.trained_ids_path, int(metrics.get(TRAINED_IDS_METRIC, 0)))
            self._ids_file = open(settings.trained_ids_path, "a", encoding="utf-8")  # noqa: SIM115 (lives with us)

        self._pending: list[Any] = []  # impression records polled but not yet handled (survive a Kafka error)
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self._rate_window = (time.monotonic(), 0)
        self._consumed = 0
        self._last_event_time: dict[int, float] = {}
        self._items_primed = False

        self.kafka = TrainerKafka(settings)
        self.dead_letters = TrainerDeadLetters(self.kafka.producer, settings, self.metrics)
        if settings.snapshots_topic:
            self.publisher.notify = notice_sender(self.kafka.producer, settings.snapshots_topic)
        try:
            self._assign_partitions()
        except StoredOffsetOutOfRange:
            self.close()
            raise

    # ------------------------------------------------------------------ start-up steps (a rank of a group overrides)
    def _make_lease(self) -> TrainerLease:
        return TrainerLease(self.store.root, ttl_s=self.settings.lease_ttl_s)

    def _tidy_store(self) -> None:
        remove_unfinished_snapshots(self.store)

    def _load(self) -> tuple[HSNN, Manifest | None, dict[str, bytes]]:
        return load_or_create(self.store, self.settings.hsnn_config)

    def _single_ids_file(self) -> bool:
        """One trained-ids file for the whole stream (a group writes one per partition instead)."""
        return True

    def _assign_partitions(self) -> None:
        """Assign the impression partitions, seek them to the snapshot's offsets, halt on one outside the log."""
        self.kafka.enforce_stored_offsets(
            self.kafka.assign(self.offsets), self.offsets, self.metrics.offset_out_of_range.inc
        )

    # ------------------------------------------------------------------ items
    def catch_up_items(self, timeout: float = 30.0) -> int:
        """Read the items topic up to the end offsets as of now; returns item records applied."""
        started = time.perf_counter()
        applied = self.kafka.read_items_to_end(self._apply_item, self.offsets, timeout)
        self._items_primed = True
        self.timings.items += time.perf_counter() - started
        return applied

    def _apply_item(self, record: Any) -> int:
        try:
            event = decode_item(record.value)
        except MalformedEvent as err:
            self.metrics.item_events.labels("malformed").inc()
            log.warning("malformed item record %s[%d]@%d: %s", record.topic, record.partition, record.offset, err)
            if self.settings.dead_letter_items:
                self.dead_letters.record(record, err.reason, topic=self.settings.items_dlq_topic)
            return 0
        if self.catalogue.apply(event):
            self.metrics.item_events.labels("applied").inc()
            return 1
        self.metrics.item_events.labels("stale").inc()
        return 0

    # ------------------------------------------------------------------ impressions
    def poll_once(self, timeout_ms: int | None = None) -> int:
        """Poll one batch of impressions, train on it, advance the offsets; returns records handled.

        A Kafka error (e.g. the broker is away) propagates *before* anything is trained, and the
        polled records are kept, so calling again later neither loses nor repeats them.
        """
        self._poll_pending(timeout_ms)
        if not self._pending and self._items_primed:
            self._update_lag()
            return 0
        self.catch_up_items()  # after the poll: every ad created before these impressions is now known
        records, self._pending = self._pending, []
        self._handle(records)
        self.dead_letters.send()
        self._update_lag()
        return len(records)

    def _poll_pending(self, timeout_ms: int | None) -> None:
        """Poll, unless records of an earlier poll are still pending (kept across a Kafka error)."""
        if self._pending:
            return
        started = time.perf_counter()
        timeout_ms = self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms
        self._pending = self.kafka.poll_full(timeout_ms, self.metrics.offset_out_of_range.inc)
        self.timings.poll += time.perf_counter() - started

    def _handle(self, records: list[Any]) -> None:
        started = time.perf_counter()
        train: list[ImpressionEvent] = []
        for _, event in triage(records, decode_impression, self._reject, self.dead_letters):
            if not self._held_out(event):
                train.append(event)
        self.timings.decode += time.perf_counter() - started
        self._train(train)
        for record in records:
            self.offsets.advance(record.topic, record.partition, record.offset)
        self._consumed += len(records)
        self._since_snapshot += len(records)

    def _held_out(self, event: ImpressionEvent) -> bool:
        """Keep one event in `holdout_one_in` (chosen by id) for evaluation instead of training on it."""
        if not is_held_out(event.event_id, self.settings.holdout_one_in):
            return False
        self.eval_buffer.append((event, self.catalogue.live[event.ad_id]))
        self.metrics.events.labels("eval").inc()
        return True

    def _reject(self, record: Any, event: ImpressionEvent) -> str | None:
        """Why the trainer cannot take a decoded impression (unknown ad, schema misfit); notes the lag metric's time."""
        self._last_event_time[record.partition] = event.event_time
        reason = self.catalogue.why_missing(event.ad_id)
        if reason is None and (problems := impression_problems(event, self.catalogue.live[event.ad_id], self.schema)):
            reason = f"schema mismatch: {problems[0]}"
        return reason

    def _train(self, events: list[ImpressionEvent]) -> None:
        size = self.settings.batch_size
        for start in range(0, len(events), size):
            chunk = events[start : start + size]
            t0 = time.perf_counter()
            batch = self._to_batch(chunk)
            if batch is None:
                continue
            t1 = time.perf_counter()
            self.optimizer.arm()
            stats = train_step(self.model, batch, self.optimizer)  # type: ignore[arg-type] (guarded optimizer)
            t2 = time.perf_counter()
            self.timings.batch += t1 - t0
            self.timings.train += t2 - t1
            if not self._account_step(chunk, stats):
                continue
            if self._ids_file is not None:
                self._ids_file.write("".join(json.dumps(e.event_id) + "\n" for e in chunk))
                self._ids_file.flush()  # visible to readers now; durable (fsync) only at the next snapshot
                self._ids_lines += len(chunk)

    def _to_batch(self, events: list[ImpressionEvent]) -> TrainingBatch | None:
        """The training batch of `events` (on the trainer's device); None when conversion failed (dead-lettered)."""
        try:
            return self._on_device(impressions_to_batch(events, self.schema, self.catalogue.live, checked=True))
        except ValueError as err:  # pre-checked per event, so this is a bug: dead-letter, do not crash
            log.exception("batch conversion failed; dead-lettering %d events", len(events))
            for event in events:
                self.dead_letters.event(event, f"batch conversion failed: {err}")
            return None

    def _on_device(self, batch: TrainingBatch) -> TrainingBatch:
        """A batch where the model lives: the single trainer's model is on the CPU."""
        return batch

    def _account_step(self, events: list[ImpressionEvent], stats: dict[str, float]) -> bool:
        """Metrics, counters and watermark after a step over `events`; False when the guard skipped the step.

        Skipped events are consumed (offsets advance) but not trained: counted, never written.
        """
        self.metrics.grad_norm.set(self.optimizer.last_grad_norm)
        if self.optimizer.skipped:
            self.metrics.skipped_steps.inc()
            self.metrics.events.labels("skipped").inc(len(events))
            log.error(
                "train step skipped: non-finite loss %s / gradient norm %s over %d events (ids %s ...)",
                stats.get("total"),
                self.optimizer.last_grad_norm,
                len(events),
                [e.event_id for e in events[:3]],
            )
            return False
        if self.optimizer.clipped:
            self.metrics.clipped_steps.inc()
        self.metrics.loss.set(stats["total"])
        self.metrics.events.labels("trained").inc(len(events))
        self.trained_total += len(events)
        newest = max(e.event_time for e in events)
        self.watermark = newest if self.watermark is None else max(self.watermark, newest)
        self._observe_trained(events)
        return True

    def _observe_trained(self, events: list[ImpressionEvent]) -> None:
        """Freshness: each event's (trained_at - event_time), and the newest event time now in the weights."""
        trained_at = self.clock()
        observe_many(self.metrics.event_to_trained, [max(0.0, trained_at - e.event_time) for e in events])
        if self.watermark is not None:
            self.metrics.trained_event_time.set(self.watermark)

    # ------------------------------------------------------------------ dead letters
    def flush_dead_letters(self, timeout: float = 10.0) -> bool:
        """True once every dead letter so far is acknowledged by the broker (the snapshot depends on it)."""
        return self.dead_letters.acknowledged(timeout)

    # ------------------------------------------------------------------ metrics
    def _update_lag(self) -> None:
        self.metrics.set_lag(self.kafka.lag(self.offsets), self._last_event_time)
        then, count = self._rate_window
        elapsed = time.monotonic() - then
        if elapsed >= 1.0:
            self.metrics.events_per_second.set((self._consumed - count) / elapsed)
            self._rate_window = (time.monotonic(), self._consumed)

    # ------------------------------------------------------------------ snapshots
    def eval_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {"events": float(len(self.eval_buffer))}
        clicks = sum(e.labels.click for e, _ in self.eval_buffer)
        if len(self.eval_buffer) >= self.settings.eval_min_events and 0 < clicks < len(self.eval_buffer):
            events = [e for e, _ in self.eval_buffer]
            items = {e.ad_id: f for e, f in self.eval_buffer}  # an ad's newest features in the buffer
            batch = self._on_device(impressions_to_batch(events, self.schema, items, checked=True))
            probs = predict(self.model, batch)
            metrics["ne"] = normalized_entropy(probs[:, 0].cpu(), batch.labels[:, 0].cpu())
            self.metrics.rolling_ne.set(metrics["ne"])
        metrics[TRAINED_TOTAL_METRIC] = float(self.trained_total)
        if self._ids_file is not None:
            metrics[TRAINED_IDS_METRIC] = float(self._ids_lines)
        return metrics

    def snapshot_due(self) -> bool:
        if self._since_snapshot >= self.settings.snapshot_every_events:
            return True
        return (
            self._since_snapshot > 0
            and time.monotonic() - self._last_snapshot_at >= self.settings.snapshot_every_seconds
        )

    def maybe_snapshot(self, force: bool = False) -> PublishResult | None:
        """Publish a snapshot if one is due (or `force`); None if not due or dead letters are not yet acknowledged."""
        if not force and not self.snapshot_due():
            return None
        started = time.perf_counter()
        if not self.flush_dead_letters():
            log.warning("snapshot postponed: %d dead letters not acknowledged", len(self.dead_letters))
            return None
        if not self._items_primed:
            self.catch_up_items()
        if self._ids_file is not None:
            self._ids_file.flush()
            os.fsync(self._ids_file.fileno())  # durable *before* the snapshot that counts these lines
        refuse_non_finite(self.model, self.metrics.non_finite_snapshots.inc)  # the step guard should prevent it
        self.lease.renew(force=True)  # raises LeaseLost if another trainer took the store: write nothing
        result = self.publisher.publish(
            self.model,
            offsets=self.offsets.as_manifest(),
            event_time_watermark=self.watermark,
            eval_metrics=self.eval_metrics(),
            extra_files=dump_trainer_state(self.optimizer.inner, self.eval_buffer),
        )
        self.manifest = result.manifest
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self.metrics.last_snapshot.set(result.manifest.created_at)
        self.timings.snapshot += time.perf_counter() - started
        log.info(
            "snapshot %d (%s): offsets %s, eval %s",
            result.manifest.version,
            "promoted" if result.promoted else "not promoted",
            result.manifest.offsets,
            result.manifest.eval_metrics,
        )
        self.commit_offsets()
        return result

    def commit_offsets(self) -> bool:
        """Commit the impression offsets to the group: for lag dashboards only, the manifest is the truth."""
        try:
            self.kafka.commit(self.offsets)
            return True
        except KafkaError as err:
            self.metrics.kafka_errors.inc()
            log.warning("offset commit failed (lag metrics only, nothing lost): %s", err)
            return False

    # ------------------------------------------------------------------ loop
    def run(self, should_stop: Any, max_idle_polls: int | None = None) -> None:
        """Poll, train and snapshot until `should_stop()` is true (see `trainer.loop.run_loop`)."""
        run_loop(self, should_stop, max_idle_polls)

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Final snapshot (retried while Kafka is away, up to `timeout`), commit, close; False if it failed."""
        ok = final_snapshot(self, timeout)
        self.close()
        return ok

    def close(self) -> None:
        if getattr(self, "kafka", None) is not None:
            self.kafka.close()
        if self._ids_file is not None:
            self._ids_file.close()
            self._ids_file = None
        self.lease.release()


__all__: Iterable[str] = ["OnlineTrainer"]
