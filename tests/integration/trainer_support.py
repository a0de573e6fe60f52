"""What the trainer's integration tests share, for one trainer (test_trainer.py) and a group of ranks
(test_trainer_ddp.py): fresh topics, the planted events, the trainer's settings and environment, waiting."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaProducer

from devservers import KafkaServer
from streaming.events import (
    Engagement,
    ImpressionEvent,
    ItemEvent,
    ItemFeatures,
    Labels,
    UserFeatures,
    encode,
    event_key,
)
from trainer.settings import TrainerSettings
from worlds.planted import tiny_hsnn_config

REPO = Path(__file__).resolve().parents[2]
HOLDOUT = 20
NUM_ADS = 30


def make_topics(kafka: KafkaServer, prefix: str, partitions: int = 2) -> dict[str, str]:
    """Fresh impressions, items (compacted) and dead-letter topics, named `<prefix>-...-<random tag>`."""
    tag = uuid.uuid4().hex[:8]
    names = {
        "impressions": f"{prefix}-imp-{tag}",
        "items": f"{prefix}-items-{tag}",
        "impressions_dlq": f"{prefix}-imp-dlq-{tag}",
        "items_dlq": f"{prefix}-items-dlq-{tag}",
    }
    kafka.create_topics([names["impressions"], names["impressions_dlq"], names["items_dlq"]], partitions=partitions)
    kafka.create_topics([names["items"]], partitions=partitions, compacted=[names["items"]])
    return names


def make_item(ad_id: int, sequence: int = 1, op: str = "create") -> ItemEvent:
    features = None
    if op != "expire":
        features = ItemFeatures(
            dense=[ad_id % 3, 0.5, -0.25, 1.0], sparse={"advertiser": ad_id % 7 + 1, "category": ad_id % 5 + 1}
        )
    return ItemEvent(op=op, ad_id=ad_id, event_time=1_767_225_000.0 + sequence, sequence=sequence, features=features)


def make_impression(i: int, ad_id: int | None = None, prefix: str = "imp") -> ImpressionEvent:
    ad = ad_id if ad_id is not None else i % NUM_ADS + 1
    click = int(i % 3 == 0)
    return ImpressionEvent(
        event_id=f"{prefix}-{i}",
        event_time=1_767_225_600.0 + i,
        user=UserFeatures(
            dense=[0.1 * (i % 10), -0.5],
            sparse={"segment": [i % 6 + 1], "age_bucket": [i % 4 + 1]},
            history=[
                Engagement(attributes={"item_id": ad, "advertiser": ad % 7 + 1, "category": ad % 5 + 1}, age_hours=3.0)
            ],
        ),
        ad_id=ad,
        labels=Labels(click=click, conversion=click * int(i % 2 == 0)),
    )


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_block_ms=20_000)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in records]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=10)
    finally:
        producer.close()


def produce_events(bootstrap: str, topic: str, events: list[ImpressionEvent] | list[ItemEvent]) -> None:
    produce(bootstrap, topic, [(event_key(e), encode(e)) for e in events])


def stream(
    kafka: KafkaServer, topic_prefix: str, rows: range, event_prefix: str = "imp", partitions: int = 2
) -> tuple[dict[str, str], list[ImpressionEvent]]:
    """Fresh topics holding every ad's create and one impression per row: (topics, impressions)."""
    topics = make_topics(kafka, topic_prefix, partitions=partitions)
    produce_events(kafka.bootstrap_servers, topics["items"], [make_item(ad) for ad in range(1, NUM_ADS + 1)])
    events = [make_impression(i, prefix=event_prefix) for i in rows]
    produce_events(kafka.bootstrap_servers, topics["impressions"], events)
    return topics, events


def trainer_settings(
    kafka: KafkaServer, topics: dict[str, str], tmp: Path, group_prefix: str, **overrides: object
) -> TrainerSettings:
    """A trainer on `topics` with the tiny model, a store under `tmp` and a trained-ids file; `overrides` win."""
    config = tmp / "hsnn.json"
    config.write_text(tiny_hsnn_config().model_dump_json())
    values: dict[str, object] = {
        "kafka_bootstrap_servers": kafka.bootstrap_servers,
        "group_id": f"{group_prefix}-{uuid.uuid4().hex[:6]}",
        "impressions_topic": topics["impressions"],
        "items_topic": topics["items"],
        "impressions_dlq_topic": topics["impressions_dlq"],
        "items_dlq_topic": topics["items_dlq"],
        "store_dir": str(tmp / "store"),
        "model_config_path": str(config),
        "batch_size": 128,
        "max_poll_records": 128,
        "eval_min_events": 5,
        "holdout_one_in": HOLDOUT,
        "metrics_port": 0,
        "trained_ids_path": str(tmp / "trained-ids.txt"),
        "snapshot_every_seconds": 600.0,
        "snapshot_every_events": 10**9,
    }
    values.update(overrides)
    return TrainerSettings(**values)


def trainer_env(settings: TrainerSettings, **overrides: object) -> dict[str, str]:
    """This environment plus `settings` (and `overrides`) as HSNN_TRAINER_* variables, for `python -m trainer`."""
    env = dict(os.environ)
    for name, value in {**settings.model_dump(), **overrides}.items():
        if value is not None:
            env[f"HSNN_TRAINER_{name.upper()}"] = str(value)
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll `condition` every 0.1 s; on timeout fail, with the tail of `log` when given."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}".rstrip())
        time.sleep(0.1)
