"""The indexer: keeps the versioned index in Redis in step with the promoted snapshot and the item events.

Three steps, each callable on its own (tests drive them one by one; `run` loops over them):

- `start()`: adopt the index Redis already serves (load its model to encode deltas), or do a full
  rebuild from the promoted snapshot when there is none.
- `check_snapshot()`: poll the store's PROMOTED pointer; on a new version, load it (sha256-verified;
  a corrupt one is refused, counted and not retried), run the item tower + LTI over every live ad,
  write a new index version, flip `index:current` with compare-and-set, catch up on catalogue
  changes the scan may have missed, garbage-collect.
- `consume_once()`: one Kafka poll of `hsnn.items`: decode, dead-letter what is malformed (or does
  not fit the model's schema), apply the rest atomically to the catalogue and the current version's
  delta, then checkpoint: once every dead letter is acknowledged, the next offsets are written to
  Redis beside the catalogue (`catalog:offsets`) and committed to the group (for lag only). A crash
  before the checkpoint replays events, which is harmless: applying an item event is idempotent.

Redis holds the catalogue *and* how far into `hsnn.items` it has read, so the two cannot disagree:
after a FLUSHALL or a restart without persistence the offsets are gone with the catalogue, and the
indexer replays the topic from the beginning; after an AOF restore that lost the last writes, the
offsets are as old as the catalogue and the gap is replayed. While a replay runs, no index is built:
a rebuild from a partial catalogue would serve a shrunken index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis as redis_lib
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from hsnn.index import build_index
from hsnn.model import HSNN
from indexer.catalogue_offsets import CatalogueCursor, read_catalogue_offsets
from indexer.gate import level_health, within_capacity
from indexer.metrics import IndexerMetrics
from indexer.settings import IndexerSettings
from streaming.codec import decode_item
from streaming.consumer import DeadLetters, triage
from streaming.contracts import ItemEvent
from streaming.dead_letters import DeadLetterMessage
from streaming.health import Heartbeat
from streaming.index_store import (
    APPLIED,
    RETRY,
    SUPERSEDED,
    IndexKeys,
    ItemEncoder,
    allocate_version,
    apply_item_events,
    catalog_to_batch,
    catch_up,
    changes_position,
    current_version,
    delete_version,
    fits_schema,
    flip_pointer,
    gc,
    read_catalog,
    read_meta,
    write_index,
)
from streaming.kafka_clients import dead_letter_producer, loop_consumer
from streaming.offsets import assign_all_partitions
from streaming.snapshots import CorruptSnapshot, SnapshotStore
from streaming.validation import item_event_problems

log = logging.getLogger("hsnn.indexer")


class Indexer:
    def __init__(
        self,
        settings: IndexerSettings,
        redis: redis_lib.Redis | None = None,
        metrics: IndexerMetrics | None = None,
    ):
        self.settings = settings
        self.prefix = settings.key_prefix
        self.redis = redis or redis_lib.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_connect_timeout_s,
            health_check_interval=30,
        )
        self.store = SnapshotStore(settings.store_dir)
        self.metrics = metrics or IndexerMetrics()
        self.encoder: ItemEncoder | None = None  # model of the current index version: encodes deltas
        self.encoder_model_version: int | None = None
        self.model: HSNN | None = None  # the newest promoted model loaded
        self.model_version: int | None = None
        self.refused: set[int] = set()  # snapshot versions that failed verification (not retried)
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._dead_letters: DeadLetters | None = None
        self.cursor = CatalogueCursor(self.redis, self.prefix, settings.items_topic, self.metrics)
        self._last_flipped = 0  # highest index version this process flipped (survives a FLUSHALL of the counter)
        self.heartbeat = Heartbeat(settings.heartbeat_max_age_s)

    # ---------------------------------------------------------------- snapshot and rebuild

    def start(self) -> None:
        """Adopt the index Redis serves, or rebuild from the promoted snapshot when there is none."""
        if current_version(self.redis, self.prefix) is not None:
            self._adopt_current()
        self.check_snapshot()

    def _load(self, version: int) -> HSNN | None:
        try:
            model, _ = self.store.load(version)
        except (CorruptSnapshot, OSError, ValueError, RuntimeError) as err:
            log.error("refusing snapshot %d: %s", version, err)
            self.metrics.snapshot_failures.inc()
            self.refused.add(version)
            return None
        if not isinstance(model, HSNN):
            log.error("refusing snapshot %d: it holds a %s, not an HSNN", version, type(model).__name__)
            self.metrics.snapshot_failures.inc()
            self.refused.add(version)
            return None
        return model

    def _adopt_current(self) -> None:
        """Encode deltas with the model of the version the pointer holds (another indexer may have flipped)."""
        version = current_version(self.redis, self.prefix)
        if version is None:
            self.encoder, self.encoder_model_version = None, None
            return
        model_version = int(read_meta(self.redis, version, self.prefix)["model_version"])
        if model_version == self.model_version and self.model is not None:
            model = self.model
        elif model_version == self.encoder_model_version and self.encoder is not None:
            model = self.encoder.model
        else:
            model = self._load(model_version)
        if model is None:  # the serving index's snapshot is gone or corrupt: only a rebuild can help
            self.encoder, self.encoder_model_version = None, None
            return
        self.encoder = ItemEncoder(model, version, self.settings.batch_size)
        self.encoder_model_version = model_version
        self.metrics.index_version.set(version)
        self.metrics.model_version.set(model_version)

    def check_snapshot(self) -> bool:
        """Load a newly promoted snapshot and rebuild the index with it; True when a new version went live.

        Also rebuilds when the index under the pointer vanished (Redis flushed or restarted empty), but
        only once the catalogue is complete again: never from a catalogue that is still being replayed.
        """
        pointer = self.store.promoted()
        if pointer is not None and pointer.version != self.model_version and pointer.version not in self.refused:
            model = self._load(pointer.version)
            if model is not None:
                self.model, self.model_version = model, pointer.version
        if self.encoder is not None and current_version(self.redis, self.prefix) != self.encoder.index_version:
            self._adopt_current()  # another indexer flipped, or the index is gone
        if self.model is None or (self.encoder is not None and self.encoder_model_version == self.model_version):
            return False
        if not self.catalogue_complete():
            self.metrics.deferred_rebuilds.inc()
            log.info("rebuild for snapshot %s deferred: the catalogue is incomplete (replaying)", self.model_version)
            return False
        return self.rebuild(self.model, self.model_version) is not None

    def catalogue_complete(self) -> bool:
        """Redis records how far the catalogue has read the items topic, and no replay is running."""
        return self.cursor.complete()

    def rebuild(self, model: HSNN, model_version: int) -> int | None:
        """Full rebuild over every live ad; returns the new index version, or None if nothing went live."""
        started = time.perf_counter()
        expected = current_version(self.redis, self.prefix)
        since = changes_position(self.redis, self.prefix)  # before the scan: later changes are caught up
        schema = model.config.features
        entries = read_catalog(self.redis, self.prefix)
        usable = [e for e in entries if fits_schema(e, schema)]
        if len(usable) < len(entries):
            self.metrics.skipped_ads.inc(len(entries) - len(usable))
            log.warning("rebuild leaves out %d ads whose features do not fit the schema", len(entries) - len(usable))
        if not usable:
            log.info("no live ads in the catalogue yet; index for snapshot %d deferred", model_version)
            return None
        items = catalog_to_batch(usable, schema)
        ad_ids = torch.tensor([e.ad_id for e in usable], dtype=torch.long)
        index = build_index(
            model,
            ad_ids,
            items,
            batch_size=self.settings.batch_size,
            progress=self.settings.progress,
            capacity_factor=self.settings.capacity_factor,
        )
        health = level_health(index)
        if not within_capacity(health, self.settings.max_node_over_mean):
            # the cap could not be met (e.g. a capacity_factor above the limit): keep serving the current index
            self.metrics.refused_indexes.inc()
            log.error(
                "index for snapshot %d refused: a node holds more than %.2fx its level's mean (health %s)",
                model_version,
                self.settings.max_node_over_mean,
                health,
            )
            return None
        version = self._allocate()
        write_index(
            self.redis,
            index,
            version,
            model_version,
            prefix=self.prefix,
            chunk_bytes=self.settings.chunk_bytes,
            extra_meta={
                "catalog_changes_since": since,
                "skipped_ads": len(entries) - len(usable),
                "catalog_offsets": read_catalogue_offsets(self.redis, self.settings.items_topic, self.prefix) or {},
                "level_health": health,
            },
        )
        if not flip_pointer(self.redis, expected, version, self.prefix):
            log.warning("index pointer moved during the rebuild (expected %s); dropping version %d", expected, version)
            delete_version(self.redis, version, self.prefix)
            self._adopt_current()
            return None
        self._last_flipped = max(self._last_flipped, version)
        self.encoder = ItemEncoder(model, version, self.settings.batch_size)
        self.encoder_model_version = model_version
        caught_up = catch_up(self.redis, since, self.encoder, self.prefix)
        deleted = gc(self.redis, self.settings.keep_versions, self.prefix)
        elapsed = time.perf_counter() - started
        self.metrics.rebuild_seconds.observe(elapsed)
        self.metrics.index_version.set(version)
        self.metrics.model_version.set(model_version)
        self.metrics.published.set(time.time())
        for level, level_stats in enumerate(health):
            self.metrics.node_size.labels(level=str(level)).set(level_stats["max_over_mean"])
        log.info(
            "index %d (snapshot %d) over %d ads live in %.2fs; %d caught up, GC removed %s",
            version,
            model_version,
            index.num_items,
            elapsed,
            caught_up,
            deleted,
        )
        return version

    def _allocate(self) -> int:
        """A fresh version number, above every version this process flipped even if Redis lost its counter."""
        version = allocate_version(self.redis, self.prefix)
        if version <= self._last_flipped:
            self.redis.set(IndexKeys(self.prefix).next_version, self._last_flipped + 1)
            version = allocate_version(self.redis, self.prefix)
        return version

    # ---------------------------------------------------------------- item events

    def _get_consumer(self) -> KafkaConsumer:
        """The items consumer, every partition assigned; it seeks to the catalogue's offsets, never by policy."""
        if self._consumer is None:
            consumer = loop_consumer(
                self.settings.kafka_bootstrap_servers,
                group_id=self.settings.group_id,
                auto_offset_reset="earliest",  # never used: every partition is sought explicitly before a poll
            )
            try:
                partitions = assign_all_partitions(consumer, self.settings.items_topic)
            except Exception:
                consumer.close()
                raise
            self._consumer = consumer
            self.cursor.attach(partitions)
        return self._consumer

    def _get_dead_letters(self) -> DeadLetters:
        if self._dead_letters is None:
            self._producer = dead_letter_producer(self.settings.kafka_bootstrap_servers, shared_connection=False)
            self._dead_letters = DeadLetters(self._producer, self.settings.dlq_topic, on_letter=self._count_letter)
        return self._dead_letters

    def consume_once(self, timeout_ms: int | None = None) -> int:
        """One poll: apply what it returned, dead-letter the bad records, checkpoint. Returns records handled.

        Any error after the poll (Redis away, pointer race) rewinds the consumer to the catalogue's offsets
        before it propagates, so no polled record is skipped.
        """
        consumer = self._get_consumer()
        self.cursor.sync(consumer)
        timeout = self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms
        polled = consumer.poll(timeout_ms=timeout, max_records=self.settings.max_poll_records)
        records = [record for tp in sorted(polled, key=lambda t: (t.topic, t.partition)) for record in polled[tp]]
        try:
            if records:
                self._handle(records)
            self.cursor.checkpoint(consumer, self._dead_letters_acknowledged)
        except BaseException:
            self.cursor.rewind = True
            raise
        return len(records)

    def _handle(self, records: list) -> None:
        model = self.encoder.model if self.encoder is not None else self.model
        schema = model.config.features if model is not None else None

        def reject(record: Any, event: ItemEvent) -> str | None:
            if schema is not None and (problems := item_event_problems(event, schema)):
                return f"does not fit the model's feature schema: {problems[0]}"
            return None

        dead_letters = self._get_dead_letters()
        events = [event for _, event in triage(records, decode_item, reject, dead_letters)]
        if events:
            self.apply(events)
        dead_letters.send()

    def _dead_letters_acknowledged(self) -> bool:
        """True once every dead letter so far is acknowledged (the catalogue's offsets wait for them)."""
        if self._dead_letters is None:
            return True
        acknowledged = self._dead_letters.acknowledged(self.settings.dlq_flush_timeout_s)
        self.metrics.pending_dead_letters.set(len(self._dead_letters))
        return acknowledged

    def _count_letter(self, letter: DeadLetterMessage, reason: str, origin: str) -> None:
        self.metrics.dead_letters.inc()
        log.warning("dead-lettered %s: %s", origin, reason[:300])

    def apply(self, events: Sequence[ItemEvent]) -> list[str]:
        """Apply item events (catalogue + current delta); re-encodes with the new model if the pointer moved."""
        pending = list(range(len(events)))
        outcomes = [RETRY] * len(events)
        for _ in range(3):
            if self.encoder is None and current_version(self.redis, self.prefix) is not None:
                self._adopt_current()
            results = apply_item_events(self.redis, [events[i] for i in pending], self.encoder, self.prefix)
            now = time.time()
            for i, result in zip(pending, results, strict=True):
                outcomes[i] = result
                if result == APPLIED:
                    self.metrics.event_to_indexed.observe(max(0.0, now - events[i].event_time))
                if result in (APPLIED, SUPERSEDED):
                    self.metrics.item_events.labels(outcome=result).inc()
            pending = [i for i, r in zip(pending, results, strict=True) if r == RETRY]
            if not pending:
                return outcomes
            self._adopt_current()
        raise RuntimeError("the index pointer keeps moving; could not apply item events")

    # ---------------------------------------------------------------- loop

    def poll_once(self) -> int:
        """One snapshot check and one Kafka poll."""
        self.check_snapshot()
        return self.consume_once()

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop`; Kafka and Redis errors are counted and retried with back-off, never fatal."""
        backoff = 0.1
        started = False
        last_check = 0.0
        while not stop.is_set():
            self.heartbeat.beat()
            try:
                if not started:
                    self.start()
                    started = True
                    last_check = time.monotonic()
                if time.monotonic() - last_check >= self.settings.poll_interval_s:
                    self.check_snapshot()
                    last_check = time.monotonic()
                self.consume_once()
                backoff = 0.1
            except (KafkaError, redis_lib.RedisError) as err:
                system = "kafka" if isinstance(err, KafkaError) else "redis"
                self.metrics.loop_errors.labels(system=system).inc()
                log.warning("%s error, retrying in %.1fs: %s", system, backoff, err)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.retry_backoff_max_s)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None
            self._dead_letters = None
