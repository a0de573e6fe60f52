"""POST /items/events: ad systems push item events, the API forwards them to Kafka.

Each event is written to the items topic keyed by `hsnn.events.event_key` (the ad id, so one
ad's events stay ordered on one partition) with the bytes of `hsnn.events.encode`, exactly
what the indexer and the trainer decode. The producer uses acks="all" and idempotence; the
request is answered only once the broker has acknowledged every record, or the timeout
has passed (then the unacknowledged ones are named).

The producer is created on first use from the settings (so the app starts without a broker),
or injected (`ItemForwarder(producer=...)`) in tests.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fastapi import HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials

from hsnn.events import ItemEvent, encode, event_key
from retrieval_api.schemas import RecordPosition, UnacknowledgedEvent
from retrieval_api.settings import ApiSettings

log = logging.getLogger("hsnn.retrieval_api")


class RecordProducer(Protocol):
    """What the forwarder needs of a Kafka producer (kafka-python's `KafkaProducer` fits)."""

    def send(self, topic: str, *, key: bytes, value: bytes) -> Any:
        """Queue one record; returns a future whose `get(timeout=...)` gives metadata with partition and offset."""
        ...

    def close(self, timeout: float | None = None) -> None: ...


def kafka_producer(settings: ApiSettings) -> RecordProducer:
    """A kafka-python producer that waits for all in-sync replicas and never duplicates on retry."""
    from kafka import KafkaProducer

    timeout_ms = int(settings.kafka_ack_timeout_s * 1000)
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        max_block_ms=timeout_ms,
        request_timeout_ms=max(timeout_ms - 1, 1),
        delivery_timeout_ms=timeout_ms,
        client_id="hsnn-retrieval-api",
    )


def check_token(settings: ApiSettings, credentials: HTTPAuthorizationCredentials | None) -> None:
    """503 when no token is configured (the endpoint is off, never open); 401 without a bearer token; 403 if wrong."""
    if settings.items_token is None or not settings.items_token.get_secret_value():
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "item events disabled: HSNN_API_ITEMS_TOKEN is not set"
        )
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    expected = settings.items_token.get_secret_value().encode("utf-8")
    if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the bearer token is not valid for item events")


class ItemForwarder:
    """Writes item events to Kafka and waits for the acknowledgements (blocking: call it in a worker thread)."""

    def __init__(
        self,
        settings: ApiSettings,
        producer: RecordProducer | None = None,
        producer_factory: Callable[[ApiSettings], RecordProducer] = kafka_producer,
    ):
        self.settings = settings
        self.topic = settings.items_topic
        self._producer = producer
        self._factory = producer_factory
        self._lock = threading.Lock()

    def producer(self) -> RecordProducer:
        with self._lock:
            if self._producer is None:
                self._producer = self._factory(self.settings)
                log.info("item events go to %s on %s", self.topic, self.settings.kafka_bootstrap_servers)
            return self._producer

    def forward(
        self, events: Sequence[ItemEvent], timeout_s: float | None = None
    ) -> tuple[list[RecordPosition], list[UnacknowledgedEvent]]:
        """Send every event, then wait for each acknowledgement; returns (acknowledged, not acknowledged)."""
        timeout_s = self.settings.kafka_ack_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            producer = self.producer()
        except Exception as exc:  # no broker reachable: nothing was sent
            reason = f"no Kafka producer: {type(exc).__name__}: {exc}"
            return [], [UnacknowledgedEvent(index=i, ad_id=e.ad_id, error=reason) for i, e in enumerate(events)]
        futures: list[Any] = []
        for event in events:
            try:
                futures.append(producer.send(self.topic, key=event_key(event), value=encode(event)))
            except Exception as exc:
                futures.append(exc)
        acknowledged, failed = [], []
        for index, (event, future) in enumerate(zip(events, futures, strict=True)):
            try:
                if isinstance(future, Exception):
                    raise future
                metadata = future.get(timeout=max(deadline - time.monotonic(), 0.0))
                acknowledged.append(
                    RecordPosition(ad_id=event.ad_id, partition=metadata.partition, offset=metadata.offset)
                )
            except Exception as exc:
                failed.append(UnacknowledgedEvent(index=index, ad_id=event.ad_id, error=_reason(exc, timeout_s)))
        return acknowledged, failed

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception:
                log.exception("closing the Kafka producer failed")


def _reason(exc: Exception, timeout_s: float) -> str:
    name = type(exc).__name__
    if "Timeout" in name:
        return f"not acknowledged within {timeout_s:g}s ({name})"
    return f"{name}: {exc}" if str(exc) else name
