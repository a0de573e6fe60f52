"""Settings of the indexer: `HSNN_INDEXER_*` environment variables or the "indexer" section of the config file."""

from __future__ import annotations

from pydantic import Field

from streaming.events import ITEMS_DLQ, ITEMS_TOPIC
from streaming.index_store import DEFAULT_CHUNK_BYTES, DEFAULT_PREFIX
from streaming.settings import ServiceSettings


class IndexerSettings(ServiceSettings):
    section = "indexer"
    model_config = ServiceSettings.model_config | {"env_prefix": "HSNN_INDEXER_"}

    redis_url: str = "redis://127.0.0.1:6379/0"
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka brokers, comma separated.")
    items_topic: str = ITEMS_TOPIC
    dlq_topic: str = ITEMS_DLQ
    group_id: str = "hsnn-indexer"
    store_dir: str = Field("snapshots", description="The publisher's snapshot store (PROMOTED pointer + versions).")
    key_prefix: str = DEFAULT_PREFIX
    batch_size: int = Field(8192, ge=1, description="Ads per item-tower batch in a rebuild.")
    max_poll_records: int = Field(500, ge=1, description="Item events applied per Kafka poll.")
    poll_timeout_ms: int = Field(200, ge=0, description="How long one Kafka poll waits for records.")
    poll_interval_s: float = Field(1.0, gt=0, description="How often the PROMOTED pointer is checked.")
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=1024, description="Largest Redis value of an index blob.")
    capacity_factor: float = Field(
        2.0, ge=1.0, description="No index node may hold more than this x its level's mean (prices raised at build)."
    )
    max_node_over_mean: float = Field(
        2.0, ge=1.0, description="A built index whose largest node exceeds this x its level's mean is not flipped live."
    )
    keep_versions: int = Field(2, ge=1, description="Complete index versions kept by GC (current + previous).")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Port of /metrics; 0 disables it.")
    progress: bool = Field(False, description="Progress bars on stderr during rebuilds.")
    redis_socket_timeout_s: float = Field(5.0, gt=0, description="Redis read/write timeout (no call hangs for ever).")
    redis_connect_timeout_s: float = Field(2.0, gt=0, description="Redis connect timeout.")
    dlq_flush_timeout_s: float = Field(5.0, gt=0, description="Wait for dead-letter acks before a checkpoint.")
    retry_backoff_max_s: float = Field(5.0, gt=0, description="Cap of the back-off after a Kafka or Redis error.")
    heartbeat_max_age_s: float = Field(
        900.0, gt=0, description="/livez fails once the main loop has not turned for this long (a rebuild counts)."
    )
