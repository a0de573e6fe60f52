"""Kafka helpers shared by the consumer loops (trainer, indexer): explicit assignment and offset checks.

Both loops assign every partition of their topic themselves and seek to offsets they stored
(the trainer in its snapshot manifest, the indexer in Redis next to the catalogue), so the
broker's consumer-group offsets and `auto_offset_reset` never decide where a loop starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition


class StoredOffsetOutOfRange(RuntimeError):
    """A stored offset lies outside the partition's log: retention deleted it, or the topic was recreated.

    Not retried and not reset: resetting to the earliest offset silently retrains (or skips) a whole
    partition. An operator decides (see docs/operations.md).
    """


@dataclass(frozen=True)
class OutOfRange:
    partition: int
    stored: int
    beginning: int
    end: int

    def __str__(self) -> str:
        return f"partition {self.partition}: stored {self.stored}, log holds [{self.beginning}, {self.end})"


def assign_all_partitions(
    consumer: KafkaConsumer, topic: str, timeout: float = 30.0, keep: Callable[[int], bool] | None = None
) -> list[TopicPartition]:
    """Assign every partition of `topic` to `consumer` (no group rebalancing); waits for the metadata.

    `keep(partition)` narrows it to the partitions one rank of a trainer group owns.
    """
    deadline = time.monotonic() + timeout
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            tps = [TopicPartition(topic, p) for p in sorted(partitions) if keep is None or keep(p)]
            consumer.assign(tps)
            return tps
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic!r} not found on {consumer.config['bootstrap_servers']}")
        time.sleep(0.2)


def offsets_out_of_range(
    consumer: KafkaConsumer, stored: Mapping[TopicPartition, int], timeout_ms: int = 15_000
) -> list[OutOfRange]:
    """The stored next-offsets that are not within [log start, log end] of their partitions."""
    if not stored:
        return []
    tps = list(stored)
    beginning = consumer.beginning_offsets(tps, timeout_ms=timeout_ms)
    end = consumer.end_offsets(tps, timeout_ms=timeout_ms)
    return [
        OutOfRange(tp.partition, offset, beginning[tp], end[tp])
        for tp, offset in stored.items()
        if not beginning[tp] <= offset <= end[tp]
    ]
