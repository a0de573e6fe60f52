"""POST /items/events against a real Kafka broker: what the API acknowledges is what a consumer reads back."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, TopicPartition

from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from streaming.events import ItemEvent, decode_item, encode, event_key

pytestmark = pytest.mark.integration

TOKEN = "integration-token"


def item_events() -> list[ItemEvent]:
    features = {"dense": [0.5, -1.0, 2.0, 0.25], "sparse": {"advertiser": 7, "category": 3}}
    events = [
        {"op": "create", "ad_id": ad_id, "event_time": 1767225000.0 + ad_id, "sequence": 1, "features": features}
        for ad_id in (11, 12, 13, 14)
    ]
    events.append({"op": "update", "ad_id": 12, "event_time": 1767225100.5, "sequence": 2, "features": features})
    events.append({"op": "expire", "ad_id": 13, "event_time": 1767225200.0, "sequence": 3})
    return [ItemEvent.model_validate(e) for e in events]


def test_item_events_reach_the_topic_keyed_by_ad_id(kafka_server):
    topic = f"test.items.{uuid.uuid4().hex[:8]}"
    kafka_server.create_topics([topic], partitions=2, compacted={topic})
    settings = ApiSettings(items_token=TOKEN, kafka_bootstrap_servers=kafka_server.bootstrap_servers, items_topic=topic)
    events = item_events()
    body = {"events": [e.model_dump(mode="json", exclude_none=True) for e in events]}
    with TestClient(create_app(settings)) as client:
        response = client.post("/items/events", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 202, response.text
        assert client.post("/items/events", json=body).status_code == 401
    answer = response.json()
    assert answer["accepted"] == len(events) and answer["topic"] == topic

    consumer = KafkaConsumer(
        bootstrap_servers=kafka_server.bootstrap_servers, auto_offset_reset="earliest", consumer_timeout_ms=10_000
    )
    try:
        partitions = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records = []
        for record in consumer:
            records.append(record)
            if len(records) == len(events):
                break
    finally:
        consumer.close()
    assert len(records) == len(events)
    by_position = {(r.partition, r.offset): r for r in records}
    for event, position in zip(events, answer["records"], strict=True):
        record = by_position[(position["partition"], position["offset"])]
        assert position["ad_id"] == event.ad_id
        assert record.key == event_key(event) and record.value == encode(event)
        assert decode_item(record.value) == event
    # one ad's events share a partition, in the order they were sent
    ad_12 = [r for r in records if r.key == b"12"]
    assert len({r.partition for r in ad_12}) == 1
    assert [decode_item(r.value).sequence for r in sorted(ad_12, key=lambda r: r.offset)] == [1, 2]


def test_an_unknown_topic_is_503_not_a_hang(kafka_server):
    settings = ApiSettings(
        items_token=TOKEN,
        kafka_bootstrap_servers=kafka_server.bootstrap_servers,
        items_topic=f"missing.{uuid.uuid4().hex[:8]}",  # auto-creation is off on the dev broker
        kafka_ack_timeout_s=2,
    )
    body = {"events": [item_events()[0].model_dump(mode="json", exclude_none=True)]}
    with TestClient(create_app(settings)) as client:
        response = client.post("/items/events", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503, response.text
    assert response.json()["not_acknowledged"][0]["ad_id"] == 11
