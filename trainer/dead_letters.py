"""The trainer's dead letters: one outbox, each letter counted by reason; snapshots wait for the acknowledgements."""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaProducer

from streaming.dead_letters import DeadLetterMessage, DeadLetterOutbox, letter_for_record
from streaming.events import ImpressionEvent, dead_letter_record, encode, event_key
from trainer.metrics import TrainerMetrics, reason_label
from trainer.settings import TrainerSettings

log = logging.getLogger("hsnn.trainer")


class TrainerDeadLetters:
    """Letters for bad records (malformed, unknown ad, schema mismatch) and for events a batch could not take."""

    def __init__(self, producer: KafkaProducer, settings: TrainerSettings, metrics: TrainerMetrics):
        self.outbox = DeadLetterOutbox(producer)
        self.settings = settings
        self.metrics = metrics

    def __len__(self) -> int:
        """Letters not yet acknowledged."""
        return len(self.outbox)

    def record(self, topic: str, record: Any, reason: str) -> None:
        """Dead-letter a consumed record to `topic` (a DLQ)."""
        self._queue(letter_for_record(topic, record, reason), reason)

    def event(self, event: ImpressionEvent, reason: str) -> None:
        """Dead-letter a decoded impression (re-encoded canonically) to the impressions DLQ."""
        key = event_key(event)
        value = dead_letter_record(encode(event), reason, self.settings.impressions_topic, None, None, key=key)
        self._queue(DeadLetterMessage(self.settings.impressions_dlq_topic, key, value), reason)

    def _queue(self, letter: DeadLetterMessage, reason: str) -> None:
        self.outbox.add(letter)
        self.metrics.dead_letters.labels(reason_label(reason)).inc()
        if letter.topic == self.settings.impressions_dlq_topic:
            self.metrics.events.labels("dead_letter").inc()
        log.debug("dead letter to %s: %s", letter.topic, reason)

    def send(self) -> None:
        self.outbox.send()

    def flush(self, timeout: float = 10.0) -> bool:
        """True once every dead letter so far is acknowledged by the broker (the snapshot depends on it)."""
        return self.outbox.flush(timeout)
