"""POST /items/events: ad systems push item events, the API forwards them to Kafka.

Each event is written to the items topic keyed by `streaming.events.event_key` (the ad id, so one
ad's events stay ordered on one partition) with the bytes of `streaming.events.encode`, exactly
what the indexer and the trainer decode. The producer uses acks="all" and idempotence; the
request is answered 202 only once the broker has acknowledged every record.

Kafka is slow to fail: an unreachable broker blocks the client's constructor and each send. So
every blocking Kafka call runs on the forwarder's own small thread pool (never the pool that
scores /retrieve), the whole batch gets one time budget (`kafka_ack_timeout_s`) and the request
is answered 503 when it is spent, whatever the thread is still waiting for. When every Kafka
thread is busy, a batch is refused 503 at once rather than queued. A failed connection attempt
is not repeated for `kafka_ack_timeout_s`, so an outage costs one bootstrap, not one per request.
A producer that acknowledges nothing of a whole batch is dropped and the next batch connects
afresh (a killed and restarted broker can leave kafka-python's producer stuck, chaos E2).
After such a failure, and until Kafka acknowledges a record again, the request gate refuses item
batches 503 before their bodies are read, letting one through per `kafka_ack_timeout_s` to try
again: parsing, validating and answering 1,000 events only to refuse them loaded the event loop
enough to make the refusals themselves late (chaos E9). The time budget counts from the
request's arrival and keeps a reserve for what the server cannot time (the request before it
reaches the gate, a late timer, the answer's way back), so the client has its 503 within
`kafka_ack_timeout_s`.

The producer is created on first use from the settings (so the app starts without a broker),
or injected (`ItemForwarder(producer=...)`) in tests.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from fastapi import HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials

from retrieval_api.schemas import RecordPosition, UnacknowledgedEvent
from retrieval_api.settings import ApiSettings
from streaming.events import ItemEvent, encode, event_key

log = logging.getLogger("hsnn.retrieval_api")


class RecordProducer(Protocol):
    """What the forwarder needs of a Kafka producer (kafka-python's `KafkaProducer` fits)."""

    def send(self, topic: str, *, key: bytes, value: bytes) -> Any:
        """Queue one record; returns a future whose `get(timeout=...)` gives metadata with partition and offset."""
        ...

    def close(self, timeout: float | None = None) -> None: ...


def kafka_producer(settings: ApiSettings) -> RecordProducer:
    """A kafka-python producer that waits for all in-sync replicas and never duplicates on retry.

    Every wait it can do (bootstrap in the constructor, metadata in `send`, acknowledgements) is
    bounded by `kafka_ack_timeout_s`.
    """
    from kafka import KafkaProducer

    timeout_ms = max(int(settings.kafka_ack_timeout_s * 1000), 1)
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        batch_size=1 << 18,  # a 1,000-event post fills a few batches, not dozens (each one wakes the sender thread)
        bootstrap_timeout_ms=timeout_ms,
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


def bearer_credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """The Authorization header as FastAPI's `HTTPBearer(auto_error=False)` reads it (None unless "Bearer <token>")."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


def check_authorization_header(settings: ApiSettings, authorization: str | None) -> None:
    """`check_token` on a raw Authorization header (the request gate runs it before the body is read)."""
    check_token(settings, bearer_credentials(authorization))


TRANSIT_RESERVE_S = 0.4
"""Of the `kafka_ack_timeout_s` budget, at most this much (and at most a fifth) is left for what the server does not
time: the request before the gate stamps it, a late event-loop timer, the answer's way back (chaos E9)."""
ANSWER_RESERVE_S = 0.1
"""Of what remains, at most this much (and at most a twentieth of the budget) is kept for building the answer."""


class KafkaUnavailable(Exception):
    """No producer could be had within the time budget (broker down, or a recent attempt just failed)."""


class ItemForwarder:
    """Writes item events to Kafka and waits for the acknowledgements, within a bounded time."""

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
        self._failed_at: float | None = None  # the last failure (no producer, or one that acknowledged nothing)
        self._failure = ""
        self._connecting = False  # a producer is being created (under the lock)
        self._retry_claimed_at = float("-inf")  # when the request gate last let a request through to reconnect
        self._executor: ThreadPoolExecutor | None = None  # created on first use, again after `close`
        self._busy = 0  # batches handed to the executor and not finished (abandoned ones included)

    def producer(self, deadline: float | None = None) -> RecordProducer:
        """The producer, created on first use; raises KafkaUnavailable rather than wait past `deadline`."""
        timeout = -1 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self._lock.acquire(timeout=timeout):
            raise KafkaUnavailable("another request is still connecting to Kafka")
        try:
            if self._producer is not None:
                return self._producer
            retry_s = self.settings.kafka_ack_timeout_s
            if self._failed_at is not None and time.monotonic() - self._failed_at < retry_s:
                raise KafkaUnavailable(f"{self._failure} (retried after {retry_s:g}s)")
            self._connecting = True
            try:
                self._producer = self._factory(self.settings)
            except Exception as exc:
                self._failed_at, self._failure = time.monotonic(), f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self._connecting = False
            log.info("item events go to %s on %s", self.topic, self.settings.kafka_bootstrap_servers)
            return self._producer
        finally:
            self._lock.release()

    async def forward_async(
        self, events: Sequence[ItemEvent], received_at: float | None = None
    ) -> tuple[list[RecordPosition], list[UnacknowledgedEvent]]:
        """`forward` on the Kafka threads, answered within `kafka_ack_timeout_s` of `received_at` whatever Kafka does.

        `received_at` (`time.monotonic()`, default now) is when the request arrived: reading and
        validating the body count against the same budget, so the client has its answer within
        `kafka_ack_timeout_s` of sending. Kafka gets the budget less a small reserve for answering.
        A batch abandoned at the deadline may still be written afterwards; a retry is safe (idempotent by sequence).
        """
        timeout_s = self.settings.kafka_ack_timeout_s
        arrived = time.monotonic() if received_at is None else received_at
        answer_by = arrived + timeout_s - min(TRANSIT_RESERVE_S, timeout_s / 5)
        kafka_deadline = answer_by - min(ANSWER_RESERVE_S, timeout_s / 20)
        if self._busy >= self.settings.kafka_workers:
            return [], _all_failed(events, f"{self._busy} batches are already waiting for Kafka; retry later")
        if kafka_deadline <= time.monotonic():
            return [], _all_failed(events, f"not sent within {timeout_s:g}s (the request waited for the server)")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.settings.kafka_workers, thread_name_prefix="hsnn-kafka")
        self._busy += 1
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._forward_until, events, kafka_deadline, timeout_s)
        future.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(answer_by - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            return [], _all_failed(events, f"not acknowledged within {timeout_s:g}s")

    def admit(self, authorization: str | None) -> None:
        """The request gate's check of an item batch before its body is read: the token, then `refuse_while_down`."""
        check_authorization_header(self.settings, authorization)
        self.refuse_while_down()

    def refuse_while_down(self) -> None:
        """503 before the body is read after a failure (no producer, or one that acknowledged nothing), until Kafka
        acknowledges a record again (the request gate calls this): parsing, validating and answering 1,000 events
        only to refuse them loaded the event loop (chaos E9)."""
        if self._failed_at is None:  # cleared by the first acknowledgement after a failure
            return
        now, retry_s = time.monotonic(), self.settings.kafka_ack_timeout_s
        # After a failure, one request per `retry_s` is let through to try again (its claim lapses after
        # `retry_s` if it never reaches the producer); the others are refused here.
        if now - max(self._failed_at, self._retry_claimed_at) < retry_s or self._connecting:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"Kafka is unavailable: {self._failure} (retry later)"
            )
        self._retry_claimed_at = now

    def _finished(self, _future: asyncio.Future) -> None:
        self._busy -= 1

    def forward(
        self, events: Sequence[ItemEvent], timeout_s: float | None = None
    ) -> tuple[list[RecordPosition], list[UnacknowledgedEvent]]:
        """Send every event, then wait for each acknowledgement; returns (acknowledged, not acknowledged).

        Blocking; no event is sent once `timeout_s` has passed, and the first failed send fails the rest
        at once (a broker that cannot take one record now will not take the next).
        """
        timeout_s = self.settings.kafka_ack_timeout_s if timeout_s is None else timeout_s
        return self._forward_until(events, time.monotonic() + timeout_s, timeout_s)

    def _forward_until(
        self, events: Sequence[ItemEvent], deadline: float, timeout_s: float
    ) -> tuple[list[RecordPosition], list[UnacknowledgedEvent]]:
        """`forward` with an absolute `deadline` (`time.monotonic()`); `timeout_s` only names the budget in errors."""
        try:
            producer = self.producer(deadline)
        except Exception as exc:  # no broker reachable: nothing was sent
            return [], _all_failed(events, f"no Kafka producer: {type(exc).__name__}: {exc}")
        futures: list[Any] = []
        for event in events:
            if futures and isinstance(futures[-1], Exception):
                futures.append(futures[-1])
                continue
            if time.monotonic() >= deadline:
                futures.append(TimeoutError(f"not sent within {timeout_s:g}s"))
                continue
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
        if acknowledged:
            self._failed_at = None
        elif failed:
            self._discard(producer)
        return acknowledged, failed

    def _discard(self, producer: RecordProducer) -> None:
        """Drop a producer that acknowledged nothing of a whole batch; the next batch connects afresh.

        kafka-python's producer does not always find a broker again after it was killed and restarted
        (E2 saw one answer nothing for minutes while a new one connected at once). Its pending records
        fail (they were answered 503); a new connection is tried at most once per `kafka_ack_timeout_s`.
        """
        with self._lock:
            if self._producer is not producer:
                return
            self._producer = None
            self._failed_at, self._failure = time.monotonic(), "the previous producer acknowledged nothing"
        log.warning("the Kafka producer acknowledged no event of a batch: reconnecting on the next batch")
        threading.Thread(target=_close_quietly, args=(producer,), name="hsnn-kafka-close", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception:
                log.exception("closing the Kafka producer failed")


def _close_quietly(producer: RecordProducer) -> None:
    try:
        producer.close(timeout=0)
    except Exception:
        log.debug("closing a discarded Kafka producer failed", exc_info=True)


def _all_failed(events: Sequence[ItemEvent], reason: str) -> list[UnacknowledgedEvent]:
    return [UnacknowledgedEvent(index=i, ad_id=e.ad_id, error=reason) for i, e in enumerate(events)]


def _reason(exc: Exception, timeout_s: float) -> str:
    name = type(exc).__name__
    if "Timeout" in name:
        return f"not acknowledged within {timeout_s:g}s ({name})"
    return f"{name}: {exc}" if str(exc) else name
