"""One dead-letter outbox for every Kafka consumer loop (trainer, indexer).

A consumer may only move its offsets past a bad record once the letter for it is acknowledged by
the broker; otherwise a crash loses the record for good. The outbox keeps letters until they are
acknowledged: `send()` hands queued letters to the producer and never raises, `flush()` waits for
the acknowledgements and puts failed letters back at the head. Callers checkpoint (snapshot,
offset commit) only when `flush()` returns True. Letters are built with
`streaming.events.dead_letter_record`, which truncates the original, so a send never fails for size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streaming.events import dead_letter_record

log = logging.getLogger("hsnn.dead_letters")


@dataclass(frozen=True)
class DeadLetterMessage:
    topic: str
    key: bytes | None
    value: bytes


def letter_for_record(dlq_topic: str, record: Any, reason: str) -> DeadLetterMessage:
    """The letter for a consumed Kafka record (anything with topic, partition, offset, key, value)."""
    value = dead_letter_record(
        record.value if record.value is not None else b"",
        reason,
        record.topic,
        record.partition,
        record.offset,
        key=record.key,
    )
    return DeadLetterMessage(dlq_topic, record.key, value)


class DeadLetterOutbox:
    """Letters not yet acknowledged, in order; nothing here raises on a Kafka error."""

    def __init__(self, producer: KafkaProducer):
        self.producer = producer
        self._queued: list[DeadLetterMessage] = []
        self._in_flight: list[tuple[Any, DeadLetterMessage]] = []
        self.send_errors = 0  # sends refused or failed so far (each is retried)

    def __len__(self) -> int:
        """Letters not yet acknowledged."""
        return len(self._queued) + len(self._in_flight)

    def add(self, letter: DeadLetterMessage) -> None:
        self._queued.append(letter)

    def send(self) -> None:
        """Hand queued letters to the producer; on an immediate error keep the rest queued for later."""
        while self._queued:
            letter = self._queued[0]
            try:
                future = self.producer.send(letter.topic, key=letter.key, value=letter.value)
            except KafkaError as err:
                self.send_errors += 1
                log.warning("dead-letter send to %s deferred (%d queued): %s", letter.topic, len(self._queued), err)
                return
            self._in_flight.append((future, letter))
            self._queued.pop(0)

    def flush(self, timeout: float = 10.0) -> bool:
        """True once every letter so far is acknowledged; failed ones go back to the head of the queue."""
        self.send()
        if self._queued:
            return False
        try:
            self.producer.flush(timeout=timeout)
        except KafkaError as err:
            log.warning("dead-letter flush failed: %s", err)
        failed = [letter for future, letter in self._in_flight if not future.is_done or future.failed()]
        if failed:
            self.send_errors += len(failed)
            log.warning("%d dead letters not acknowledged; they will be re-sent", len(failed))
        self._in_flight = []
        self._queued = failed + self._queued
        return not self._queued
