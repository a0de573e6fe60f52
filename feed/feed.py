"""Stream a simulated marketplace into Kafka: item events to `hsnn.items`, impressions to `hsnn.impressions`.

Order: the initial catalogue's creates first, then the simulation in event-time order (the item events of a
tick boundary before the impressions of that tick, so a create is always sent before any impression of its
ad and an expire after the last one). Records are keyed with `streaming.events.event_key`, encoded with
`streaming.events.encode`, paced by a token bucket, and acknowledged by all in-sync replicas (acks=all, idempotent
producer, so retries neither duplicate nor reorder an ad's events). Failed sends are counted, not raised.

Optional malformed records (for DLQ tests and demos) are *extra* records on the same topics: the real
stream stays complete, and `FeedStats.malformed` says how many bad ones each topic got.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from hsnn.config import StrictModel
from streaming.events import (
    IMPRESSIONS_DLQ,
    IMPRESSIONS_TOPIC,
    ITEMS_DLQ,
    ITEMS_TOPIC,
    Event,
    ImpressionEvent,
    encode,
    event_key,
)
from worlds.simulator import Marketplace, MarketplaceConfig, scaled_config

DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000


class FeedConfig(StrictModel):
    bootstrap: str = "127.0.0.1:9092"
    rate: float = Field(2000.0, ge=0, description="Records per second over both topics; 0 = as fast as possible.")
    impressions: int = Field(100_000, ge=0)
    ads: int = Field(10_000, ge=1)
    users: int = Field(10_000, ge=1)
    seed: int = 0
    malformed_rate: float = Field(0.0, ge=0, le=1, description="Chance of an extra malformed record per record.")
    items_topic: str = ITEMS_TOPIC
    impressions_topic: str = IMPRESSIONS_TOPIC
    partitions: int = Field(1, ge=1, description="Partitions of topics the feed creates.")
    create_topics: bool = True
    chunk: int = Field(500, ge=1, description="Impressions per simulator step.")
    progress: bool = True
    marketplace: MarketplaceConfig | None = Field(None, description="Overrides ads/users/seed sizing when given.")

    @property
    def items_dlq(self) -> str:
        return ITEMS_DLQ if self.items_topic == ITEMS_TOPIC else f"{self.items_topic}.dlq"

    @property
    def impressions_dlq(self) -> str:
        return IMPRESSIONS_DLQ if self.impressions_topic == IMPRESSIONS_TOPIC else f"{self.impressions_topic}.dlq"


@dataclass
class FeedStats:
    item_events: int = 0  # valid records handed to the producer, per kind
    impressions: int = 0
    malformed: dict[str, int] = field(default_factory=dict)  # topic -> extra malformed records
    acked: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failure messages
    seconds: float = 0.0
    created_topics: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.item_events + self.impressions + sum(self.malformed.values())

    def summary(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (
            f"sent {self.sent:,} records ({self.item_events:,} item events, {self.impressions:,} impressions, "
            f"{sum(self.malformed.values()):,} malformed) in {self.seconds:.1f}s ({rate:,.0f}/s); "
            f"acked {self.acked:,}, failed {self.failed:,}"
        )


class TokenBucket:
    """Allow `rate` tokens per second on average, bursts of at most `burst`. rate <= 0: no limit."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate / 20.0)
        self.tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def acquire(self, n: float = 1.0) -> None:
        if self.rate <= 0:
            return
        while True:
            now = self._clock()
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            self._sleep((n - self.tokens) / self.rate)


# --------------------------------------------------------------------------------------------
# Malformed records
# --------------------------------------------------------------------------------------------


def malformed_value(event: Event, rng: random.Random) -> bytes:
    """A record value every reader must reject with MalformedEvent, derived from a real event."""
    payload: dict[str, Any] = json.loads(encode(event))
    kind = rng.randrange(7)
    if kind == 0:
        return encode(event)[:-7]  # truncated JSON
    if kind == 1:
        return b"\xff\xfe" + encode(event)  # not UTF-8
    if kind == 2:
        payload["schema_version"] = 99
    elif kind == 3:
        payload["unexpected_field"] = 1
    elif kind == 4:
        payload["ad_id"] = str(payload["ad_id"])  # types are not coerced
    elif kind == 5:
        payload["event_time"] = payload["event_time"] * 1000  # epoch milliseconds
    elif isinstance(event, ImpressionEvent):
        payload["labels"] = {"click": 0, "conversion": 1}
    else:
        payload["op"] = "expire"  # an expire that carries features
        payload.setdefault("features", {"dense": [], "sparse": {}})
    return json.dumps(payload).encode("utf-8")


# --------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------


def ensure_topics(config: FeedConfig, timeout: float = 30.0) -> list[str]:
    """Create the feed's topics that are missing (items compacted, DLQs long-retained); returns those created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wanted = {
        config.items_topic: {"cleanup.policy": "compact"},
        config.impressions_topic: {"cleanup.policy": "delete"},
        config.items_dlq: {"cleanup.policy": "delete", "retention.ms": str(DLQ_RETENTION_MS)},
        config.impressions_dlq: {"cleanup.policy": "delete", "retention.ms": str(DLQ_RETENTION_MS)},
    }
    admin = KafkaAdminClient(bootstrap_servers=config.bootstrap, client_id="hsnn-feed-admin")
    try:
        existing = set(admin.list_topics())
        new = [name for name in wanted if name not in existing]
        created = []
        for name in new:
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            name, num_partitions=config.partitions, replication_factor=1, topic_configs=wanted[name]
                        )
                    ],
                    timeout_ms=int(timeout * 1000),
                )
                created.append(name)
            except TopicAlreadyExistsError:  # someone else created it meanwhile: fine
                pass
        if created:  # wait until the new topics have leaders
            admin.wait_for_topics(created, timeout_ms=int(timeout * 1000))
        return created
    finally:
        admin.close()


def missing_topics(config: FeedConfig) -> list[str]:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=config.bootstrap, client_id="hsnn-feed-admin")
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    return [t for t in (config.items_topic, config.impressions_topic) if t not in existing]


# --------------------------------------------------------------------------------------------
# The feed
# --------------------------------------------------------------------------------------------


def marketplace_for(config: FeedConfig) -> Marketplace:
    return Marketplace(config.marketplace or scaled_config(config.ads, config.users, config.seed))


def simulated_events(market: Marketplace, impressions: int, chunk: int) -> Iterator[tuple[str, Event]]:
    """("item" | "impression", event) in send order: initial creates, then the simulation in event-time order."""
    for part in market.iter_initial_item_events():
        for event in part:
            yield "item", event
    left = impressions
    while left > 0:
        imps, items = market.step(min(chunk, left))
        left -= len(imps)
        i = 0
        for item in items:  # both lists are in event-time order; an item event wins ties
            while i < len(imps) and imps[i].event_time < item.event_time:
                yield "impression", imps[i]
                i += 1
            yield "item", item
        for imp in imps[i:]:
            yield "impression", imp


def make_producer(bootstrap: str, client_id: str):
    """A producer that loses nothing it acknowledged: acks from all replicas, idempotent retries."""
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_block_ms=30_000,
    )


def run_feed(config: FeedConfig, producer: Any | None = None, log: Callable[[str], None] | None = None) -> FeedStats:
    """Send the simulation to Kafka; returns counts (failed sends are counted, never raised)."""
    from tqdm import tqdm

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    stats = FeedStats()
    if config.create_topics:
        stats.created_topics = ensure_topics(config)
        if stats.created_topics:
            log(f"created topics: {', '.join(stats.created_topics)}")
    own_producer = producer is None
    if producer is None:
        producer = make_producer(config.bootstrap, "hsnn-feed")
    market = marketplace_for(config)
    bucket = TokenBucket(config.rate)
    bad_rng = random.Random(f"malformed-{config.seed}")  # separate from the simulation: same events with or without

    def acked(_metadata: Any) -> None:
        stats.acked += 1

    def failed(error: BaseException) -> None:
        stats.failed += 1
        if len(stats.errors) < 5:
            stats.errors.append(f"{type(error).__name__}: {error}")

    def send(topic: str, key: bytes, value: bytes) -> None:
        bucket.acquire()
        try:
            future = producer.send(topic, key=key, value=value)
        except Exception as error:  # e.g. a metadata timeout: count it and go on
            failed(error)
            return
        future.add_callback(acked)
        future.add_errback(failed)

    initial = int(market.live.sum())
    bar = tqdm(
        total=initial + config.impressions,
        desc="feed",
        unit="ev",
        file=sys.stderr,
        disable=not config.progress,
        dynamic_ncols=True,
        leave=False,
    )
    start = time.monotonic()
    try:
        for kind, event in simulated_events(market, config.impressions, config.chunk):
            topic = config.items_topic if kind == "item" else config.impressions_topic
            send(topic, event_key(event), encode(event))
            if kind == "item":
                stats.item_events += 1
                if stats.item_events <= initial:
                    bar.update(1)
            else:
                stats.impressions += 1
                bar.update(1)
            if config.malformed_rate and bad_rng.random() < config.malformed_rate:
                send(topic, f"malformed-{stats.sent}".encode(), malformed_value(event, bad_rng))
                stats.malformed[topic] = stats.malformed.get(topic, 0) + 1
            if stats.sent % 1000 == 0:
                bar.set_postfix(acked=stats.acked, failed=stats.failed, refresh=False)
        producer.flush(timeout=60)
    finally:
        bar.close()
        stats.seconds = time.monotonic() - start
        if own_producer:
            producer.close(timeout=10)
    unanswered = stats.sent - stats.acked - stats.failed
    if unanswered > 0:  # flush timed out: what was not acknowledged counts as failed
        stats.failed += unanswered
        stats.errors.append(f"{unanswered} record(s) unacknowledged after flush")
    return stats
