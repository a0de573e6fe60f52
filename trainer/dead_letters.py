"""The trainer's dead letters: the loop's outbox, each letter counted by reason (snapshots wait for them)."""

from __future__ import annotations

import logging

from kafka import KafkaProducer

from streaming.consumer import DeadLetters
from streaming.dead_letters import DeadLetterMessage
from streaming.events import ImpressionEvent, dead_letter_record, encode, event_key
from trainer.metrics import TrainerMetrics, reason_label
from trainer.settings import TrainerSettings

log = logging.getLogger("hsnn.trainer")


class TrainerDeadLetters(DeadLetters):
    """Letters for bad records (malformed, unknown ad, schema mismatch) and for events a batch could not take."""

    def __init__(self, producer: KafkaProducer, settings: TrainerSettings, metrics: TrainerMetrics):
        super().__init__(producer, settings.impressions_dlq_topic, on_letter=self._count)
        self.settings = settings
        self.metrics = metrics

    def event(self, event: ImpressionEvent, reason: str) -> None:
        """Dead-letter a decoded impression (re-encoded canonically) to the impressions DLQ."""
        key = event_key(event)
        value = dead_letter_record(encode(event), reason, self.settings.impressions_topic, None, None, key=key)
        self.add(DeadLetterMessage(self.settings.impressions_dlq_topic, key, value), reason, f"event {event.event_id}")

    def _count(self, letter: DeadLetterMessage, reason: str, origin: str) -> None:
        self.metrics.dead_letters.labels(reason_label(reason)).inc()
        if letter.topic == self.settings.impressions_dlq_topic:
            self.metrics.events.labels("dead_letter").inc()
        log.debug("dead letter for %s to %s: %s", origin, letter.topic, reason)
