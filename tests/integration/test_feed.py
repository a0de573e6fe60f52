"""The simulator feed against a real broker: topics created, every record acked, decodable and in order."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from devservers import KafkaServer
from feed.__main__ import main as feed_main
from feed.feed import FeedConfig, run_feed
from streaming.events import MalformedEvent, decode_impression, decode_item

pytestmark = pytest.mark.integration


def _read(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=5000).values():
                got += records
        return got
    finally:
        consumer.close()


def test_feed_streams_decodable_ordered_events(kafka_server: KafkaServer) -> None:
    suffix = uuid.uuid4().hex[:8]
    config = FeedConfig(
        bootstrap=kafka_server.bootstrap_servers,
        rate=20_000,
        impressions=1500,
        ads=300,
        users=500,
        seed=1,
        malformed_rate=0.02,
        items_topic=f"feedtest-items-{suffix}",
        impressions_topic=f"feedtest-impressions-{suffix}",
        partitions=2,
        progress=False,
    )
    stats = run_feed(config)
    assert stats.failed == 0, stats.errors
    assert stats.acked == stats.sent
    assert set(stats.created_topics) == {
        config.items_topic,
        config.impressions_topic,
        config.items_dlq,
        config.impressions_dlq,
    }
    assert stats.impressions == 1500 and stats.item_events >= 300
    assert sum(stats.malformed.values()) > 0

    described = kafka_server.admin().describe_configs([ConfigResource(ConfigResourceType.TOPIC, config.items_topic)])
    assert "compact" in str(described)

    item_records = _read(config.bootstrap, config.items_topic, stats.item_events + stats.malformed[config.items_topic])
    impression_records = _read(
        config.bootstrap,
        config.impressions_topic,
        stats.impressions + stats.malformed.get(config.impressions_topic, 0),
    )
    bad = {config.items_topic: 0, config.impressions_topic: 0}

    def decoded(records: list, decode) -> list:
        """(record, event) for the records that decode; the others count as bad and carry a malformed- key."""
        good = []
        for record in records:
            try:
                good.append((record, decode(record.value)))
            except MalformedEvent:
                bad[record.topic] += 1
                assert record.key.startswith(b"malformed-")
        return good

    items = decoded(item_records, decode_item)
    impressions = decoded(impression_records, decode_impression)
    assert len(items) == stats.item_events and len(impressions) == stats.impressions
    assert bad == {topic: stats.malformed.get(topic, 0) for topic in bad}
    assert all(record.key == str(event.ad_id).encode() for record, event in items)
    assert all(record.key == event.event_id.encode() for record, event in impressions)

    # per ad: one partition, offsets in sequence order, a create first
    first: dict[int, tuple] = {}
    last: dict[int, tuple] = {}
    for record, event in items:
        if event.ad_id in last:
            previous_record, previous = last[event.ad_id]
            assert record.partition == previous_record.partition
            assert record.offset > previous_record.offset and event.sequence > previous.sequence
        else:
            assert event.op == "create"
            first[event.ad_id] = (record, event)
        last[event.ad_id] = (record, event)
    # an impression's ad was created before it: in event time, and sent (broker timestamp) no later
    for record, event in impressions:
        create_record, create = first[event.ad_id]
        assert create.event_time <= event.event_time
        assert create_record.timestamp <= record.timestamp
        closing = last[event.ad_id][1]
        if closing.op == "expire":
            assert event.event_time < closing.event_time


def test_cli_refuses_missing_topics_without_creating_them(kafka_server: KafkaServer, capsys) -> None:
    topic = f"feedtest-absent-{uuid.uuid4().hex[:8]}"
    argv = ["--bootstrap", kafka_server.bootstrap_servers, "--items-topic", topic, "--impressions-topic", topic + "-i"]
    assert feed_main([*argv, "--no-create-topics", "--impressions", "10", "--ads", "50", "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err
    assert topic not in kafka_server.list_topics()
