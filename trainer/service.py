"""The online trainer: impressions from Kafka -> HSNN train steps -> versioned snapshots.

One loop, one thread. Each `poll_once()` takes a batch of impression records, makes sure the
item catalogue has read the items topic up to its end, routes every record (train, held-out
eval, dead letter), trains on the training share and advances the offsets. `maybe_snapshot()`
runs only between polls, so the offsets written into a snapshot manifest always describe
exactly the records whose effect is in the weights. That is the exactly-once argument; see
docs/trainer.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge

from hsnn.metrics import normalized_entropy
from hsnn.model import HSNN
from hsnn.training import make_optimizer, predict, train_step
from publisher.publisher import Publisher, PublisherMetrics, PublisherSettings, PublishResult
from streaming.dead_letters import DeadLetterMessage, DeadLetterOutbox, letter_for_record
from streaming.events import (
    ImpressionEvent,
    ItemEvent,
    ItemFeatures,
    MalformedEvent,
    SchemaMismatch,
    check_item_features,
    check_user_features,
    dead_letter_record,
    decode_impression,
    decode_item,
    encode,
    event_key,
    impressions_to_batch,
    supersedes,
)
from streaming.health import Heartbeat
from streaming.offsets import StoredOffsetOutOfRange, assign_all_partitions, offsets_out_of_range
from streaming.snapshots import CorruptSnapshot, Manifest, Pointer, SnapshotStore
from trainer.fencing import TrainerLease
from trainer.guard import GuardedOptimizer, non_finite_tensors
from trainer.settings import TrainerSettings
from trainer.state import OPTIMIZER_FILE, STATE_FILE, dump_trainer_state, restore_trainer_state

log = logging.getLogger("hsnn.trainer")

TRAINED_IDS_METRIC = "trained_ids_lines"  # eval_metrics key: lines of the trained-ids file this snapshot covers
TRAINED_TOTAL_METRIC = "trained_events_total"  # eval_metrics key: events trained over the snapshot lineage


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without servers)
# --------------------------------------------------------------------------------------------


def is_held_out(event_id: str, one_in: int) -> bool:
    """Whether an impression goes to the eval buffer instead of training.

    The rule: the first 8 bytes of blake2b(event_id), read as a big-endian integer, are 0 modulo
    `one_in`. It depends on the event id only (not on arrival order, partition or Python's salted
    `hash`), so every run and every restart holds out the same events. `one_in <= 0` holds out none.
    """
    if one_in <= 0:
        return False
    digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % one_in == 0


class OffsetBook:
    """Next offset to consume per (topic, partition): what goes into the snapshot manifest."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def set(self, topic: str, partition: int, next_offset: int) -> None:
        self._next[(topic, partition)] = next_offset

    def advance(self, topic: str, partition: int, offset: int) -> None:
        """Record that the record at `offset` was handled; offsets never move backwards."""
        key = (topic, partition)
        self._next[key] = max(self._next.get(key, 0), offset + 1)

    def get(self, topic: str, partition: int) -> int | None:
        return self._next.get((topic, partition))

    def topic(self, topic: str) -> dict[int, int]:
        return {p: o for (t, p), o in self._next.items() if t == topic}

    def as_manifest(self) -> dict[str, dict[str, int]]:
        """topic -> partition (as a string, it is JSON) -> next offset."""
        out: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(self._next.items()):
            out.setdefault(topic, {})[str(partition)] = offset
        return out

    @classmethod
    def from_manifest(cls, offsets: Mapping[str, Mapping[str, int]]) -> OffsetBook:
        book = cls()
        for topic, partitions in offsets.items():
            for partition, offset in partitions.items():
                book.set(topic, int(partition), int(offset))
        return book


def truncate_lines(path: str | Path, keep: int) -> int:
    """Cut the file to its first `keep` complete lines (fsynced); returns the lines now in it.

    Lines written after the snapshot the trainer restarts from (and a torn last line) are
    removed, so the file lists exactly the events whose training the snapshot contains.
    """
    path = Path(path)
    if not path.exists():
        path.touch()
        return 0
    size = 0
    lines = 0
    with path.open("rb") as handle:
        for line in handle:
            if lines == keep or not line.endswith(b"\n"):
                break
            size += len(line)
            lines += 1
    with path.open("r+b") as handle:
        handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())
    return lines


@dataclass
class CatalogueEntry:
    event: ItemEvent  # the newest applied event: its version is what `supersedes` compares against

    @property
    def features(self) -> ItemFeatures | None:
        return None if self.event.op == "expire" else self.event.features


class Catalogue:
    """ad id -> newest item event, applied with `streaming.events.supersedes` (expire keeps its version)."""

    def __init__(self) -> None:
        self.entries: dict[int, CatalogueEntry] = {}
        self.live: dict[int, ItemFeatures] = {}  # the mapping impressions_to_batch joins against

    def apply(self, event: ItemEvent) -> bool:
        current = self.entries.get(event.ad_id)
        if not supersedes(event, None if current is None else current.event):
            return False
        entry = CatalogueEntry(event)
        self.entries[event.ad_id] = entry
        if entry.features is None:
            self.live.pop(event.ad_id, None)
        else:
            self.live[event.ad_id] = entry.features
        return True

    def why_missing(self, ad_id: int) -> str | None:
        """None if the ad is live, else the dead-letter reason."""
        if ad_id in self.live:
            return None
        return f"unknown ad {ad_id} (expired)" if ad_id in self.entries else f"unknown ad {ad_id}"


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.events = Counter("hsnn_trainer_events", "Impressions consumed, by outcome", ["outcome"], **kw)
        self.events_per_second = Gauge("hsnn_trainer_events_per_second", "Impressions consumed per second", **kw)
        self.lag_messages = Gauge(
            "hsnn_trainer_consumer_lag_messages", "High watermark minus next offset", ["partition"], **kw
        )
        self.lag_seconds = Gauge(
            "hsnn_trainer_consumer_lag_seconds", "Now minus event time of the last consumed record", ["partition"], **kw
        )
        self.loss = Gauge("hsnn_trainer_loss", "Total loss of the last train step", **kw)
        self.rolling_ne = Gauge("hsnn_trainer_rolling_ne", "Click NE on the held-out buffer at the last snapshot", **kw)
        self.last_snapshot = Gauge(
            "hsnn_trainer_last_snapshot_timestamp_seconds", "When the trainer last published a snapshot", **kw
        )
        self.dead_letters = Counter(
            "hsnn_trainer_dead_letters", "Records sent to a dead-letter topic", ["reason"], **kw
        )
        self.item_events = Counter("hsnn_trainer_item_events", "Item records read, by outcome", ["outcome"], **kw)
        self.kafka_errors = Counter("hsnn_trainer_kafka_errors", "Kafka errors survived by the loop", **kw)
        self.skipped_steps = Counter(
            "hsnn_trainer_skipped_steps", "Train steps skipped: non-finite loss or gradient (batch not applied)", **kw
        )
        self.clipped_steps = Counter("hsnn_trainer_clipped_steps", "Train steps whose gradients were clipped", **kw)
        self.grad_norm = Gauge("hsnn_trainer_grad_norm", "Gradient norm of the last step, before clipping", **kw)
        self.offset_out_of_range = Counter(
            "hsnn_trainer_offset_out_of_range",
            "Stored offsets found outside the partition's log (the trainer halts unless told how to reset)",
            **kw,
        )
        self.halted = Gauge("hsnn_trainer_halted", "1 when the trainer stopped itself and needs an operator", **kw)
        self.lease_epoch = Gauge("hsnn_trainer_lease_epoch", "Fencing epoch of the store lease held", **kw)
        self.non_finite_snapshots = Counter(
            "hsnn_trainer_non_finite_snapshots_refused", "Snapshots not written because a weight was NaN/inf", **kw
        )
        for outcome in ("trained", "dead_letter", "eval", "skipped"):  # export zeros: dashboards see every series
            self.events.labels(outcome)
        for reason in ("malformed", "schema_mismatch", "unknown_ad"):
            self.dead_letters.labels(reason)


def _reason_label(reason: str) -> str:
    """A bounded label value for the dead-letter counter (the full reason is in the DLQ record)."""
    if reason.startswith("unknown ad"):
        return "unknown_ad"
    if reason.startswith("schema mismatch"):
        return "schema_mismatch"
    return "malformed"


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds spent per stage since start (the bench prints these)."""

    poll: float = 0.0
    items: float = 0.0
    decode: float = 0.0
    batch: float = 0.0
    train: float = 0.0
    snapshot: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def snapshot_notice(pointer: Pointer, manifest: Manifest) -> bytes:
    """The JSON notice sent for a promoted snapshot: enough for a reader to decide whether to load it."""
    return json.dumps(
        {
            "version": pointer.version,
            "promoted_at": pointer.promoted_at,
            "created_at": manifest.created_at,
            "event_time_watermark": manifest.event_time_watermark,
            "eval_metrics": manifest.eval_metrics,
        },
        sort_keys=True,
    ).encode()


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
        self.lease = TrainerLease(self.store.root, ttl_s=settings.lease_ttl_s)
        self.metrics.lease_epoch.set(self.lease.acquire(wait_s=settings.lease_wait_s))
        self._remove_unfinished_snapshots()

        self.model, self.manifest, snapshot_files = self._load_or_create()
        self.schema = self.model.config.features
        self.optimizer = GuardedOptimizer(self.model, make_optimizer(self.model, settings.lr), settings.max_grad_norm)
        self.offsets = OffsetBook.from_manifest(self.manifest.offsets if self.manifest else {})
        self.watermark: float | None = self.manifest.event_time_watermark if self.manifest else None
        metrics = self.manifest.eval_metrics if self.manifest else {}
        self.trained_total = int(metrics.get(TRAINED_TOTAL_METRIC, 0))
        self.catalogue = Catalogue()
        self.eval_buffer: deque[tuple[ImpressionEvent, ItemFeatures]] = deque(maxlen=settings.eval_buffer_size)
        self._restore_trainer_state(snapshot_files)

        self._ids_file = None
        self._ids_lines = 0
        if settings.trained_ids_path:
            self._ids_lines = truncate_lines(settings.trained_ids_path, int(metrics.get(TRAINED_IDS_METRIC, 0)))
            self._ids_file = open(settings.trained_ids_path, "a", encoding="utf-8")  # noqa: SIM115 (lives with us)

        self._pending: list[Any] = []  # impression records polled but not yet handled (survive a Kafka error)
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self._rate_window = (time.monotonic(), 0)
        self._consumed = 0
        self._last_event_time: dict[int, float] = {}
        self._items_primed = False

        common = {
            "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
            "reconnect_backoff_max_ms": 2000,
            "request_timeout_ms": 15000,
        }
        self.consumer = KafkaConsumer(
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="none",  # an out-of-range position raises; it is never silently reset
            max_poll_records=settings.max_poll_records,
            max_partition_fetch_bytes=settings.max_partition_fetch_bytes,  # a whole batch per fetch, not 1 MiB
            client_id=f"{settings.group_id}-impressions",
            **common,
        )
        self.items_consumer = KafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max(settings.max_poll_records, 4096),
            client_id=f"{settings.group_id}-items",
            **common,
        )
        self.producer = KafkaProducer(
            acks="all", linger_ms=5, max_block_ms=2000, client_id="hsnn-trainer-dlq", **common
        )
        self.dead_letters = DeadLetterOutbox(self.producer)
        if settings.snapshots_topic:
            self.publisher.notify = self._send_snapshot_notice
        self.impression_tps = assign_all_partitions(self.consumer, settings.impressions_topic)
        self.item_tps = assign_all_partitions(self.items_consumer, settings.items_topic)
        stored_offsets = {}
        for tp in self.impression_tps:
            stored = self.offsets.get(tp.topic, tp.partition)
            if stored is None:
                self.consumer.seek_to_beginning(tp)
                log.info("%s[%d]: no stored offset, starting from the beginning", tp.topic, tp.partition)
            else:
                stored_offsets[tp] = stored
                self.consumer.seek(tp, stored)
        self._check_stored_offsets(stored_offsets)
        # The catalogue is not in the snapshot: the compacted items topic *is* the catalogue, re-read from the start.
        self.items_consumer.seek_to_beginning(*self.item_tps)

    # ------------------------------------------------------------------ start-up
    def _remove_unfinished_snapshots(self) -> None:
        """Delete what a killed writer left: staging dirs, and versions renamed into place without DONE.

        Safe because the lease makes this process the store's only writer; readers never see either
        (no DONE marker), but they would pile up with every SIGKILL that lands mid-snapshot.
        """
        for staging in self.store.tmp_dir.iterdir():
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("removed the unfinished snapshot staging dir %s", staging.name)
        complete = set(self.store.versions())
        for directory in self.store.versions_dir.iterdir():
            if directory.name.isdigit() and int(directory.name) not in complete:
                shutil.rmtree(directory, ignore_errors=True)
                log.warning("removed snapshot %s: written without its DONE marker", directory.name)

    def _restore_trainer_state(self, files: dict[str, bytes]) -> None:
        """Adam moments, RNG and eval buffer from the snapshot: a resumed run continues the uninterrupted one."""
        if STATE_FILE not in files or OPTIMIZER_FILE not in files:
            if self.manifest is not None:
                log.warning("snapshot %d has no trainer state: fresh optimiser, no eval buffer", self.manifest.version)
            return
        try:
            self.eval_buffer.extend(restore_trainer_state(self.optimizer.inner, files))
        except (ValueError, KeyError, RuntimeError) as err:
            log.warning("trainer state of the snapshot unusable (%s): fresh optimiser, empty eval buffer", err)
            self.optimizer.inner.state.clear()
            self.eval_buffer.clear()

    def _load_or_create(self) -> tuple[HSNN, Manifest | None, dict[str, bytes]]:
        """Newest *written* snapshot that verifies (promoted or not): its weights and offsets belong together."""
        for version in reversed(self.store.versions()):
            try:
                model, manifest, files = self.store.load_with_files(version)
            except (CorruptSnapshot, ValueError, OSError) as err:
                log.error("snapshot %d unusable, trying the one before: %s", version, err)
                continue
            if not isinstance(model, HSNN):
                raise TypeError(f"snapshot {version} holds a {type(model).__name__}, the trainer trains HSNN")
            wanted = self.settings.hsnn_config()
            if model.config != wanted:
                log.warning("snapshot %d has a different model config than the settings; continuing it", version)
            log.info("resuming from snapshot %d (offsets %s)", version, manifest.offsets)
            return model, manifest, files
        log.info("no snapshot in %s: starting a fresh model", self.store.root)
        return HSNN(self.settings.hsnn_config()), None, {}

    def _check_stored_offsets(self, stored: dict[TopicPartition, int]) -> None:
        """A stored offset outside the log halts the trainer, unless `on_offset_out_of_range` says how to reset.

        Past the log end: the topic was recreated or the broker lost data; before the log start: retention
        deleted events the trainer never read. Either way a silent reset retrains or skips a whole partition.
        """
        bad = offsets_out_of_range(self.consumer, stored)
        if not bad:
            return
        self.metrics.offset_out_of_range.inc(len(bad))
        detail = "; ".join(str(b) for b in bad)
        policy = self.settings.on_offset_out_of_range
        if policy == "fail":
            self.close()
            raise StoredOffsetOutOfRange(
                f"{self.settings.impressions_topic}: {detail}. Set HSNN_TRAINER_ON_OFFSET_OUT_OF_RANGE=earliest "
                "or =latest for one start to reset these partitions deliberately (see docs/trainer.md)."
            )
        for item in bad:
            target = item.beginning if policy == "earliest" else item.end
            log.error("%s: reset to %s offset %d by the operator's setting", item, policy, target)
            self.consumer.seek(TopicPartition(self.settings.impressions_topic, item.partition), target)
            self.offsets.set(self.settings.impressions_topic, item.partition, target)

    # ------------------------------------------------------------------ items
    def catch_up_items(self, timeout: float = 30.0) -> int:
        """Read the items topic up to the end offsets as of now; returns item records applied."""
        started = time.perf_counter()
        end = self.items_consumer.end_offsets(self.item_tps, timeout_ms=int(timeout * 1000))
        applied = 0
        deadline = time.monotonic() + timeout
        while any(self.items_consumer.position(tp) < end[tp] for tp in self.item_tps):
            if time.monotonic() > deadline:
                raise KafkaError(f"items topic not caught up within {timeout:.0f}s")
            for records in self.items_consumer.poll(timeout_ms=200).values():
                for record in records:
                    applied += self._apply_item(record)
        for tp in self.item_tps:
            self.offsets.set(tp.topic, tp.partition, self.items_consumer.position(tp))
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
                self._dead_letter(self.settings.items_dlq_topic, record, err.reason)
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
        if not self._pending:
            started = time.perf_counter()
            self._pending = self._poll_full(self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms)
            self.timings.poll += time.perf_counter() - started
        if not self._pending and self._items_primed:
            self._update_lag()
            return 0
        self.catch_up_items()  # after the poll: every ad created before these impressions is now known
        records, self._pending = self._pending, []
        self._handle(records)
        self.dead_letters.send()
        self._update_lag()
        return len(records)

    def _poll_full(self, timeout_ms: int) -> list[Any]:
        """Up to `max_poll_records` records: polls again (without waiting) while the fetched data has more.

        A Kafka poll returns what one fetch buffered, so its size depends on where fetches happened to
        start; filling up makes the batches a function of the stream alone, and a resumed trainer forms
        the same batches as an uninterrupted one.
        """
        wanted = self.settings.max_poll_records
        out: list[Any] = []
        wait = timeout_ms
        try:
            while len(out) < wanted:
                try:
                    polled = self.consumer.poll(timeout_ms=wait, max_records=wanted - len(out))
                except KafkaError as err:
                    if out and not isinstance(err, OffsetOutOfRangeError):
                        break  # the consumer has moved past `out`: hand those over, the error comes back next poll
                    raise
                got = [record for records in polled.values() for record in records]
                if not got and (wait > 0 or not self._log_has_more()):
                    break
                out += got
                wait = 0 if got else timeout_ms  # the log has more than was fetched: wait for that fetch
        except OffsetOutOfRangeError as err:  # retention overtook the trainer while it ran
            self.metrics.offset_out_of_range.inc()
            raise StoredOffsetOutOfRange(
                f"{self.settings.impressions_topic}: position out of the log while running ({err}); "
                "see docs/trainer.md for a deliberate reset"
            ) from None
        return out

    def _log_has_more(self) -> bool:
        """Whether some partition's log (as of the last fetch) extends past the consumer's position."""
        for tp in self.impression_tps:
            highwater = self.consumer.highwater(tp)
            if highwater is not None and self.consumer.position(tp) < highwater:
                return True
        return False

    def _handle(self, records: list[Any]) -> None:
        started = time.perf_counter()
        train: list[ImpressionEvent] = []
        topic = self.settings.impressions_dlq_topic
        for record in records:
            try:
                event = decode_impression(record.value)
            except MalformedEvent as err:
                self._dead_letter(topic, record, err.reason)
                continue
            self._last_event_time[record.partition] = event.event_time
            reason = self.catalogue.why_missing(event.ad_id)
            if reason is None:
                features = self.catalogue.live[event.ad_id]
                try:
                    check_user_features(event.user, self.schema)
                    check_item_features(features, event.ad_id, self.schema)
                except SchemaMismatch as err:
                    reason = f"schema mismatch: {err}"
            if reason is not None:
                self._dead_letter(topic, record, reason)
            elif is_held_out(event.event_id, self.settings.holdout_one_in):
                self.eval_buffer.append((event, features))
                self.metrics.events.labels("eval").inc()
            else:
                train.append(event)
        self.timings.decode += time.perf_counter() - started
        self._train(train)
        for record in records:
            self.offsets.advance(record.topic, record.partition, record.offset)
        self._consumed += len(records)
        self._since_snapshot += len(records)

    def _train(self, events: list[ImpressionEvent]) -> None:
        size = self.settings.batch_size
        for start in range(0, len(events), size):
            chunk = events[start : start + size]
            t0 = time.perf_counter()
            try:
                batch = impressions_to_batch(chunk, self.schema, self.catalogue.live)
            except ValueError as err:  # pre-checked per event, so this is a bug: dead-letter, do not crash
                log.exception("batch conversion failed; dead-lettering %d events", len(chunk))
                for event in chunk:
                    self._dead_letter_event(event, f"batch conversion failed: {err}")
                continue
            t1 = time.perf_counter()
            self.optimizer.arm()
            stats = train_step(self.model, batch, self.optimizer)  # type: ignore[arg-type] (guarded optimizer)
            t2 = time.perf_counter()
            self.timings.batch += t1 - t0
            self.timings.train += t2 - t1
            self.metrics.grad_norm.set(self.optimizer.last_grad_norm)
            if self.optimizer.skipped:
                # The events are consumed (offsets advance) but not trained: counted, never written.
                self.metrics.skipped_steps.inc()
                self.metrics.events.labels("skipped").inc(len(chunk))
                log.error(
                    "train step skipped: non-finite loss %s / gradient norm %s over %d events (ids %s ...)",
                    stats.get("total"),
                    self.optimizer.last_grad_norm,
                    len(chunk),
                    [e.event_id for e in chunk[:3]],
                )
                continue
            if self.optimizer.clipped:
                self.metrics.clipped_steps.inc()
            self.metrics.loss.set(stats["total"])
            self.metrics.events.labels("trained").inc(len(chunk))
            self.trained_total += len(chunk)
            newest = max(e.event_time for e in chunk)
            self.watermark = newest if self.watermark is None else max(self.watermark, newest)
            if self._ids_file is not None:
                self._ids_file.write("".join(json.dumps(e.event_id) + "\n" for e in chunk))
                self._ids_file.flush()  # visible to readers now; durable (fsync) only at the next snapshot
                self._ids_lines += len(chunk)

    # ------------------------------------------------------------------ dead letters
    def _dead_letter(self, topic: str, record: Any, reason: str) -> None:
        self._queue_dead_letter(letter_for_record(topic, record, reason), reason)

    def _dead_letter_event(self, event: ImpressionEvent, reason: str) -> None:
        key = event_key(event)
        value = dead_letter_record(encode(event), reason, self.settings.impressions_topic, None, None, key=key)
        self._queue_dead_letter(DeadLetterMessage(self.settings.impressions_dlq_topic, key, value), reason)

    def _queue_dead_letter(self, letter: DeadLetterMessage, reason: str) -> None:
        self.dead_letters.add(letter)
        self.metrics.dead_letters.labels(_reason_label(reason)).inc()
        if letter.topic == self.settings.impressions_dlq_topic:
            self.metrics.events.labels("dead_letter").inc()
        log.debug("dead letter to %s: %s", letter.topic, reason)

    def flush_dead_letters(self, timeout: float = 10.0) -> bool:
        """True once every dead letter so far is acknowledged by the broker (the snapshot depends on it)."""
        return self.dead_letters.flush(timeout)

    # ------------------------------------------------------------------ metrics
    def _update_lag(self) -> None:
        now = time.time()
        for tp in self.impression_tps:
            label = str(tp.partition)
            highwater = self.consumer.highwater(tp)
            position = self.offsets.get(tp.topic, tp.partition)
            if highwater is not None and position is not None:
                self.metrics.lag_messages.labels(label).set(max(0, highwater - position))
            if tp.partition in self._last_event_time:
                self.metrics.lag_seconds.labels(label).set(max(0.0, now - self._last_event_time[tp.partition]))
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
            batch = impressions_to_batch(events, self.schema, items)
            probs = predict(self.model, batch)
            metrics["ne"] = normalized_entropy(probs[:, 0], batch.labels[:, 0])
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
        poisoned = non_finite_tensors(self.model)
        if poisoned:  # the step guard should make this impossible; a snapshot with NaN is never written
            self.metrics.non_finite_snapshots.inc()
            raise FloatingPointError(f"refusing to snapshot non-finite weights: {poisoned[:5]}")
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

    def _send_snapshot_notice(self, pointer: Pointer, manifest: Manifest) -> None:
        """Best effort: the pointer file is the source of truth, so a failed notice is only logged."""
        try:
            self.producer.send(
                self.settings.snapshots_topic,
                key=str(pointer.version).encode(),
                value=snapshot_notice(pointer, manifest),
            )
        except Exception as exc:
            log.warning("could not send the notice for snapshot %d: %s", pointer.version, exc)

    def commit_offsets(self) -> bool:
        """Commit the impression offsets to the group: for lag dashboards only, the manifest is the truth."""
        offsets = {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp in self.impression_tps
            if (offset := self.offsets.get(tp.topic, tp.partition)) is not None
        }
        try:
            self.consumer.commit(offsets, timeout_ms=5000)
            return True
        except KafkaError as err:
            self.metrics.kafka_errors.inc()
            log.warning("offset commit failed (lag metrics only, nothing lost): %s", err)
            return False

    # ------------------------------------------------------------------ loop
    def run(self, should_stop: Any, max_idle_polls: int | None = None) -> None:
        """Poll, train and snapshot until `should_stop()` is true; Kafka errors are logged and retried with back-off.

        `max_idle_polls`: also return after that many empty polls in a row (benchmarks, tests).
        """
        backoff = 0.1
        idle = 0
        while not should_stop():
            self.heartbeat.beat()
            self.lease.renew()
            try:
                handled = self.poll_once()
                self.maybe_snapshot()
                backoff = 0.1
            except KafkaError as err:
                self.metrics.kafka_errors.inc()
                log.warning("Kafka error, retrying in %.1fs: %s", backoff, err)
                _sleep_unless(should_stop, backoff)
                backoff = min(backoff * 2, self.settings.retry_backoff_max_seconds)
                continue
            idle = 0 if handled else idle + 1
            if max_idle_polls is not None and idle >= max_idle_polls:
                return

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Final snapshot (retried while Kafka is away, up to `timeout`), commit, close; False if it failed."""
        deadline = time.monotonic() + timeout
        ok = False
        while True:
            try:
                ok = self.maybe_snapshot(force=True) is not None
            except KafkaError as err:
                log.warning("final snapshot: Kafka error: %s", err)
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not ok:
            log.error("no final snapshot: the next start resumes from the previous one (nothing is lost)")
        self.close()
        return ok

    def close(self) -> None:
        for client in (self.consumer, self.items_consumer):
            try:
                client.close(autocommit=False)
            except Exception:  # closing is best effort
                log.debug("consumer close failed", exc_info=True)
        try:
            self.producer.close(timeout=5)
        except Exception:
            log.debug("producer close failed", exc_info=True)
        if self._ids_file is not None:
            self._ids_file.close()
            self._ids_file = None
        self.lease.release()


def _sleep_unless(should_stop: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < deadline:
        time.sleep(min(0.05, seconds))


def consumed_ids(path: str | Path) -> list[str]:
    """The event ids in a trained-ids file (one JSON string per line)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


__all__: Iterable[str] = [
    "Catalogue",
    "OffsetBook",
    "OnlineTrainer",
    "TrainerMetrics",
    "consumed_ids",
    "is_held_out",
    "truncate_lines",
]
