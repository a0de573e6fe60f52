"""Settings of the retrieval API: `HSNN_API_*` environment variables or the "api" section of the config file.

The item-event token is a secret: it is read from `HSNN_API_ITEMS_TOKEN` (or passed to the
constructor), and a config file that carries it is refused rather than silently used.
"""

from __future__ import annotations

import logging
from typing import Annotated

import torch
from pydantic import Field, SecretStr

from streaming.contracts import ITEMS_TOPIC, MAX_FEATURE_MAGNITUDE
from streaming.settings import ServiceSettings
from streaming.validation import UserLimits

log = logging.getLogger("hsnn.retrieval_api")


class ApiSettings(ServiceSettings):
    section = "api"
    model_config = ServiceSettings.model_config | {"env_prefix": "HSNN_API_"}

    beams: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [16, 64],
        min_length=1,
        description="Nodes kept at each index level, coarsest first; one entry per level of the served model.",
    )
    max_batch: int = Field(32, ge=1, description="Most requests scored in one pass.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long the first request of a batch waits for company.")
    queue_size: int = Field(256, ge=1, description="Requests waiting beyond this are refused with 429.")
    max_history: int = Field(512, ge=1, description="Most history events accepted per request.")
    device: str = Field("cpu", pattern="^(cpu|cuda)$", description='"cuda" is used only when a GPU is present.')

    # serving process
    host: str = Field("127.0.0.1", description="Address `python -m retrieval_api` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `python -m retrieval_api` listens on (0: any free one).")
    header_timeout_s: float = Field(
        20.0,
        gt=0,
        description="A connection that has not sent a whole request's headers this long after opening (or after "
        "the first byte of its next request) is closed: slowloris clients do not hold sockets for ever.",
    )
    keep_alive_timeout_s: float = Field(
        75.0,
        gt=0,
        description="An idle kept-alive connection is closed after this long. Longer than the idle expiry of client "
        "pools and proxies (httpx 5 s, nginx and load balancers 60 s), so they drop a connection before the server "
        "does: uvicorn's 5 s default raced httpx's 5 s and reset requests (chaos soak).",
    )
    gil_switch_interval_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="`sys.setswitchinterval` of `python -m retrieval_api`: how long a busy thread (scoring, Kafka) "
        "keeps the GIL from the event loop (Python's 5 ms default let them delay answers by seconds, chaos E9).",
    )

    # hot swap
    store_dir: str | None = Field(
        None, description="Snapshot store root written by the publisher; the watcher follows its PROMOTED pointer."
    )
    catalog: str | None = Field(
        None,
        description='Ads to build the index from: "planted:N[:SEED]" (the planted demo world) or a .safetensors file '
        "(item_ids, dense, sparse.<name>). The Redis index source will replace this.",
    )
    redis_url: str | None = Field(
        None,
        description="Serve the indexer's index from this Redis (its pointer picks the snapshot); unset: build the "
        "index in process from `catalog`.",
    )
    key_prefix: str = Field("hsnn:", min_length=1, description="Key prefix of the indexer's Redis layout.")
    delta_interval_s: float = Field(0.25, gt=0, description="How often item creates/expires are read from Redis.")
    reload_interval_s: float = Field(2.0, gt=0, description="How often the watcher reads the PROMOTED pointer.")
    reload_backoff_s: float = Field(
        60.0, gt=0, description="A version that failed to load is retried after this long, or at once if re-promoted."
    )

    # item events
    items_token: SecretStr | None = Field(
        None, description="Bearer token of POST /items/events (env HSNN_API_ITEMS_TOKEN only); unset: endpoint off."
    )
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka brokers, comma separated.")
    items_topic: str = Field(ITEMS_TOPIC, min_length=1, description="Topic item events are forwarded to.")
    kafka_ack_timeout_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="POST /items/events is answered within this long of its arrival: 202 once Kafka acknowledged "
        "every event, else 503 (connecting, sending and acknowledgements all count; a small reserve is kept for "
        "answering).",
    )
    kafka_workers: int = Field(
        4, ge=1, le=64, description="Item-event batches forwarded at once; more are answered 503 at once."
    )

    # hostile input
    max_body_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Largest request body accepted (declared or streamed); a larger one is answered 413 before "
        "it is buffered.",
    )
    max_dense_magnitude: float = Field(
        MAX_FEATURE_MAGNITUDE,
        gt=0,
        le=MAX_FEATURE_MAGNITUDE,
        description="Largest absolute dense feature value accepted on /retrieve (at most the event contract's bound).",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After header sent with every 429 and 503.")

    @property
    def user_limits(self) -> UserLimits:
        """The bounds /retrieve puts on a user beyond the model's schema (`streaming.validation.user_problems`)."""
        return UserLimits(max_history=self.max_history, max_dense_magnitude=self.max_dense_magnitude)

    def resolved_device(self) -> str:
        """The device to serve on: "cuda" only when asked for and available, else "cpu" (logged)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            log.warning("device=cuda requested but no GPU is available; serving on cpu")
            return "cpu"
        return self.device
