"""The consumer skeleton the trainer and the indexer share: decode -> validate -> route -> dead-letter outbox -> commit.

A loop polls records and `triage`s them: each is decoded (`streaming.codec`), the loop says whether it can
take the event (schema fit by `streaming.validation`, a known ad, ...), and the rest are queued as dead letters
with the reason. The loop does its own work with what it kept (the trainer trains and decides when to snapshot;
the indexer writes catalogue and index delta), sends the letters, and checkpoints (a snapshot, an offset commit)
only once `DeadLetters.acknowledged()`: a record is never skipped before its letter is safe on the broker.
Clients come from `streaming.kafka_clients`; the outbox is `streaming.dead_letters`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from kafka import KafkaProducer

from streaming.codec import MalformedEvent
from streaming.dead_letters import DeadLetterMessage, DeadLetterOutbox, letter_for_record

log = logging.getLogger("hsnn.dead_letters")

E = TypeVar("E")


class DeadLetters:
    """A loop's dead-letter outbox: letters for consumed records, told to `on_letter` as they are queued."""

    def __init__(
        self,
        producer: KafkaProducer,
        topic: str,
        on_letter: Callable[[DeadLetterMessage, str, str], None] | None = None,
    ):
        """`topic` is the loop's DLQ; `on_letter(letter, reason, origin)` counts and logs each letter (`origin`
        says which record it carries, e.g. `hsnn.items[0]@42`)."""
        self.outbox = DeadLetterOutbox(producer)
        self.topic = topic
        self.on_letter = on_letter

    def __len__(self) -> int:
        """Letters not yet acknowledged."""
        return len(self.outbox)

    def record(self, record: Any, reason: str, topic: str | None = None) -> None:
        """Dead-letter a consumed record (to the loop's DLQ unless `topic` names another)."""
        origin = f"{record.topic}[{record.partition}]@{record.offset}"
        self.add(letter_for_record(topic or self.topic, record, reason), reason, origin)

    def add(self, letter: DeadLetterMessage, reason: str, origin: str) -> None:
        self.outbox.add(letter)
        if self.on_letter is not None:
            self.on_letter(letter, reason, origin)

    def send(self) -> None:
        """Hand queued letters to the producer (never raises)."""
        self.outbox.send()

    def acknowledged(self, timeout: float) -> bool:
        """True once every letter so far is acknowledged by the broker: only then may the loop checkpoint."""
        if not len(self.outbox):
            return True
        if self.outbox.flush(timeout):
            return True
        log.warning("checkpoint held back: %d dead letters not acknowledged", len(self.outbox))
        return False


def triage(
    records: Iterable[Any],
    decode: Callable[[bytes], E],
    reject: Callable[[Any, E], str | None],
    dead_letters: DeadLetters,
) -> list[tuple[Any, E]]:
    """Decode and check each record; returns (record, event) for the ones the loop can take, in order.

    A record that does not decode, or whose event `reject(record, event)` gives a reason for, is dead-lettered
    with that reason.
    """
    kept: list[tuple[Any, E]] = []
    for record in records:
        try:
            event = decode(record.value)
        except MalformedEvent as err:
            dead_letters.record(record, err.reason)
            continue
        reason = reject(record, event)
        if reason is None:
            kept.append((record, event))
        else:
            dead_letters.record(record, reason)
    return kept
