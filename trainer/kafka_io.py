"""The trainer's Kafka side: which clients, where they start, how a batch is polled, where lag comes from.

Three clients built by `streaming.kafka_clients`: the impressions consumer (every partition assigned,
positioned at the offsets of the snapshot it resumes from), the items consumer (always from the start:
the compacted items topic *is* the catalogue) and one producer (dead letters, snapshot notices).
Nothing here trains or decides; `OnlineTrainer` drives it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata

from streaming.kafka_clients import dead_letter_producer, loop_consumer
from streaming.offsets import StoredOffsetOutOfRange, assign_all_partitions, offsets_out_of_range
from trainer.bookkeeping import OffsetBook
from trainer.settings import TrainerSettings

log = logging.getLogger("hsnn.trainer")


class TrainerKafka:
    """The impressions consumer, the items consumer and the producer of one trainer."""

    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        bootstrap = settings.kafka_bootstrap_servers
        self.consumer = loop_consumer(
            bootstrap,
            group_id=settings.group_id,
            auto_offset_reset="none",  # an out-of-range position raises; it is never silently reset
            max_poll_records=settings.max_poll_records,
            max_partition_fetch_bytes=settings.max_partition_fetch_bytes,  # a whole batch per fetch, not 1 MiB
            client_id=f"{settings.group_id}-impressions",
        )
        self.items_consumer = loop_consumer(
            bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            max_poll_records=max(settings.max_poll_records, 4096),
            client_id=f"{settings.group_id}-items",
        )
        self.producer = dead_letter_producer(bootstrap, client_id="hsnn-trainer-dlq")
        self.impression_tps: list[TopicPartition] = []
        self.item_tps: list[TopicPartition] = []

    def assign(self, offsets: OffsetBook, owns: Callable[[int], bool] | None = None) -> dict[TopicPartition, int]:
        """Assign every impression partition (or those `owns(partition)` keeps: one rank's share of a group)
        and every items partition; impressions seek to their stored offsets, items to the start.

        Returns the stored impression offsets (to be checked against the log).
        """
        self.impression_tps = assign_all_partitions(self.consumer, self.settings.impressions_topic, keep=owns)
        self.item_tps = assign_all_partitions(self.items_consumer, self.settings.items_topic)
        stored_offsets = {}
        for tp in self.impression_tps:
            stored = offsets.get(tp.topic, tp.partition)
            if stored is None:
                self.consumer.seek_to_beginning(tp)
                log.info("%s[%d]: no stored offset, starting from the beginning", tp.topic, tp.partition)
            else:
                stored_offsets[tp] = stored
                self.consumer.seek(tp, stored)
        # The catalogue is not in the snapshot: the compacted items topic *is* the catalogue, re-read from the start.
        self.items_consumer.seek_to_beginning(*self.item_tps)
        return stored_offsets

    def enforce_stored_offsets(
        self, stored: dict[TopicPartition, int], offsets: OffsetBook, count_bad: Callable[[int], Any]
    ) -> None:
        """A stored offset outside the log halts the trainer, unless `on_offset_out_of_range` says how to reset.

        Past the log end: the topic was recreated or the broker lost data; before the log start: retention
        deleted events the trainer never read. Either way a silent reset retrains or skips a whole partition.
        Raises StoredOffsetOutOfRange (policy "fail"), or seeks and records the reset offsets in `offsets`.
        """
        bad = offsets_out_of_range(self.consumer, stored)
        if not bad:
            return
        count_bad(len(bad))
        detail = "; ".join(str(b) for b in bad)
        policy = self.settings.on_offset_out_of_range
        topic = self.settings.impressions_topic
        if policy == "fail":
            raise StoredOffsetOutOfRange(
                f"{topic}: {detail}. Set HSNN_TRAINER_ON_OFFSET_OUT_OF_RANGE=earliest "
                "or =latest for one start to reset these partitions deliberately (see docs/trainer.md)."
            )
        for item in bad:
            target = item.beginning if policy == "earliest" else item.end
            log.error("%s: reset to %s offset %d by the operator's setting", item, policy, target)
            self.consumer.seek(TopicPartition(topic, item.partition), target)
            offsets.set(topic, item.partition, target)

    def read_items_to_end(self, apply: Callable[[Any], int], offsets: OffsetBook, timeout: float) -> int:
        """Read the items topic up to its end offsets as of now through `apply(record)`; returns their sum.

        The items consumer's positions go into `offsets` (the snapshot records how far the catalogue read).
        """
        end = self.items_consumer.end_offsets(self.item_tps, timeout_ms=int(timeout * 1000))
        applied = 0
        deadline = time.monotonic() + timeout
        while any(self.items_consumer.position(tp) < end[tp] for tp in self.item_tps):
            if time.monotonic() > deadline:
                raise KafkaError(f"items topic not caught up within {timeout:.0f}s")
            for records in self.items_consumer.poll(timeout_ms=200).values():
                for record in records:
                    applied += apply(record)
        for tp in self.item_tps:
            offsets.set(tp.topic, tp.partition, self.items_consumer.position(tp))
        return applied

    def poll_full(self, timeout_ms: int, on_out_of_range: Any) -> list[Any]:
        """Up to `max_poll_records` records: polls again (without waiting) while the fetched data has more.

        A Kafka poll returns what one fetch buffered, so its size depends on where fetches happened to
        start; filling up makes the batches a function of the stream alone, and a resumed trainer forms
        the same batches as an uninterrupted one. `on_out_of_range()` is called before the halt is raised.
        """
        wanted = self.settings.max_poll_records
        out: list[Any] = []
        if not self.impression_tps:  # a rank of a group owning no partition: nothing to poll, wait as a poll would
            time.sleep(timeout_ms / 1000)
            return out
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
                if not got and (wait > 0 or not self.log_has_more()):
                    break
                out += got
                wait = 0 if got else timeout_ms  # the log has more than was fetched: wait for that fetch
        except OffsetOutOfRangeError as err:  # retention overtook the trainer while it ran
            on_out_of_range()
            raise StoredOffsetOutOfRange(
                f"{self.settings.impressions_topic}: position out of the log while running ({err}); "
                "see docs/trainer.md for a deliberate reset"
            ) from None
        return out

    def log_has_more(self) -> bool:
        """Whether some partition's log (as of the last fetch) extends past the consumer's position."""
        for tp in self.impression_tps:
            highwater = self.consumer.highwater(tp)
            if highwater is not None and self.consumer.position(tp) < highwater:
                return True
        return False

    def lag(self, offsets: OffsetBook) -> dict[int, int]:
        """partition -> high watermark minus the next offset to train (partitions with both known)."""
        out = {}
        for tp in self.impression_tps:
            highwater = self.consumer.highwater(tp)
            position = offsets.get(tp.topic, tp.partition)
            if highwater is not None and position is not None:
                out[tp.partition] = max(0, highwater - position)
        return out

    def commit(self, offsets: OffsetBook) -> None:
        """Commit the impression offsets to the group (raises KafkaError)."""
        commit = {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp in self.impression_tps
            if (offset := offsets.get(tp.topic, tp.partition)) is not None
        }
        self.consumer.commit(commit, timeout_ms=5000)

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
