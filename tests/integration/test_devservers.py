"""The dev servers behave like the production setup the services rely on.

These talk to a real broker and a real redis-server (see conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaTimeoutError

from devservers import KafkaServer, RedisServer

pytestmark = pytest.mark.integration


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_block_ms=10_000)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value).get(timeout=10)
    finally:
        producer.close()


def _read_all(bootstrap: str, topic: str, expected: int, timeout: float = 20.0) -> list[tuple[bytes, bytes]]:
    """Read a single-partition topic from the beginning without a consumer group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got += [(r.key, r.value) for r in records]
        return got
    finally:
        consumer.close()


def test_kafka_round_trip_with_consumer_group(kafka_server: KafkaServer) -> None:
    # A group consumer needs __consumer_offsets, which only works on one node
    # because the offsets topic replication factor is 1.
    topic = _topic("roundtrip")
    assert kafka_server.create_topics([topic], partitions=2) == [topic]
    sent = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(5)]
    _produce(kafka_server.bootstrap_servers, topic, sent)

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_server.bootstrap_servers,
        group_id=_topic("group"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        got: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 20
        while len(got) < len(sent) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got += [(r.key, r.value) for r in records]
        consumer.commit()
    finally:
        consumer.close()
    assert sorted(got) == sorted(sent)


def test_create_topics_is_idempotent_and_sets_compaction(kafka_server: KafkaServer) -> None:
    plain, compact = _topic("plain"), _topic("compact")
    assert kafka_server.create_topics([plain, compact], compacted={compact}) == [plain, compact]
    assert kafka_server.create_topics([plain, compact], compacted={compact}) == []

    configs = kafka_server.admin().describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, compact), ConfigResource(ConfigResourceType.TOPIC, plain)]
    )["topic"]
    # Only non-default ("modified") configs come back, so `plain` has none.
    assert configs[compact]["cleanup.policy"]["value"] == "compact"
    assert "cleanup.policy" not in configs[plain]


def test_restart_keeps_topics_and_messages(kafka_server: KafkaServer) -> None:
    topic = _topic("durable")
    kafka_server.create_topics([topic])
    sent = [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]
    _produce(kafka_server.bootstrap_servers, topic, sent)
    bootstrap, pid = kafka_server.bootstrap_servers, kafka_server.pid

    kafka_server.stop()
    assert not kafka_server.running
    kafka_server.start()

    assert kafka_server.pid != pid
    assert kafka_server.bootstrap_servers == bootstrap
    assert topic in kafka_server.list_topics()
    assert _read_all(bootstrap, topic, expected=len(sent)) == sent


def test_topics_are_not_auto_created(kafka_server: KafkaServer) -> None:
    topic = _topic("unknown")
    producer = KafkaProducer(bootstrap_servers=kafka_server.bootstrap_servers, max_block_ms=1500)
    try:
        with pytest.raises(KafkaTimeoutError):
            producer.send(topic, b"lost").get(timeout=5)
    finally:
        producer.close(timeout=1)

    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_server.bootstrap_servers, consumer_timeout_ms=1000)
    try:
        assert list(consumer) == []
    finally:
        consumer.close()
    assert topic not in kafka_server.list_topics()


def test_reopening_data_dir_reuses_ports(kafka_server: KafkaServer) -> None:
    # The KRaft voter record pins the controller endpoint, so ports must follow the data dir.
    again = KafkaServer(kafka_server.data_dir)
    assert (again.broker_port, again.controller_port) == (kafka_server.broker_port, kafka_server.controller_port)
    with pytest.raises(ValueError, match="ports"):
        KafkaServer(kafka_server.data_dir, broker_port=kafka_server.broker_port + 1)


def test_redis_set_get_and_noeviction(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set("devservers:test", "value")
        assert client.get("devservers:test") == b"value"
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

        # noeviction means a full instance rejects writes instead of dropping keys.
        client.config_set("maxmemory", "1")
        try:
            with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
                client.set("devservers:more", "x" * 1024)
        finally:
            client.config_set("maxmemory", "0")
        assert client.get("devservers:test") == b"value"
    finally:
        client.delete("devservers:test", "devservers:more")
        client.close()


def test_cli_up_starts_and_stops_on_sigterm(redis_binary: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devservers", "up", "--data-dir", str(tmp_path), "--no-kafka"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("REDIS_URL=redis://127.0.0.1:"), line
        client = redis.Redis.from_url(line.split("=", 1)[1])
        assert client.ping()
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(line.split("=", 1)[1], socket_connect_timeout=1).ping()
