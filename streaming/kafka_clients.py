"""The one place Kafka clients of the consumer loops are built (trainer, indexer).

Both loops talk to the same brokers with the same patience: reconnect back-off capped at 2 s, requests
timed out after 15 s. Consumers never commit on their own (the loops store their offsets themselves);
the dead-letter producer waits for every in-sync replica (acks=all) and blocks a send at most 2 s.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, KafkaProducer

RECONNECT_BACKOFF_MAX_MS = 2000
REQUEST_TIMEOUT_MS = 15_000


def bootstrap_list(bootstrap_servers: str) -> list[str]:
    """`host:port,host:port` as the list kafka-python takes."""
    return bootstrap_servers.split(",")


def connection_options(bootstrap_servers: str) -> dict[str, Any]:
    """What every client of a loop shares: the brokers, the reconnect back-off and the request timeout."""
    return {
        "bootstrap_servers": bootstrap_list(bootstrap_servers),
        "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
        "request_timeout_ms": REQUEST_TIMEOUT_MS,
    }


def loop_consumer(bootstrap_servers: str, **options: Any) -> KafkaConsumer:
    """A consumer that never commits by itself; `options` add to (or override) the shared connection options."""
    return KafkaConsumer(**{**connection_options(bootstrap_servers), "enable_auto_commit": False, **options})


def dead_letter_producer(bootstrap_servers: str, *, shared_connection: bool = True, **options: Any) -> KafkaProducer:
    """The producer behind a `DeadLetterOutbox`: acks=all, 5 ms linger, a send blocks at most 2 s.

    `shared_connection=False` keeps kafka-python's own reconnect back-off and request timeout (the indexer's).
    """
    base = (
        connection_options(bootstrap_servers)
        if shared_connection
        else {"bootstrap_servers": bootstrap_list(bootstrap_servers)}
    )
    return KafkaProducer(**{**base, "acks": "all", "linger_ms": 5, "max_block_ms": 2000, **options})
