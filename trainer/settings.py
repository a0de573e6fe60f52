"""Trainer settings: env vars `HSNN_TRAINER_<FIELD>`, the "trainer" section of $HSNN_CONFIG_FILE, defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from hsnn.config import HSNNConfig
from streaming.events import IMPRESSIONS_DLQ, IMPRESSIONS_TOPIC, ITEMS_DLQ, ITEMS_TOPIC, SNAPSHOTS_TOPIC
from streaming.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    section = "trainer"
    model_config = ServiceSettings.model_config | {"env_prefix": "HSNN_TRAINER_"}

    # Kafka
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka brokers, comma separated.")
    group_id: str = Field("hsnn-trainer", description="Offsets are committed here after each snapshot (for lag).")
    impressions_topic: str = IMPRESSIONS_TOPIC
    items_topic: str = ITEMS_TOPIC
    impressions_dlq_topic: str = IMPRESSIONS_DLQ
    items_dlq_topic: str = ITEMS_DLQ
    snapshots_topic: str | None = Field(
        None,
        description=f"Topic that gets a JSON notice per promoted snapshot (e.g. {SNAPSHOTS_TOPIC!r}); readers can "
        "also poll the store's PROMOTED pointer. Unset: no notices.",
    )
    dead_letter_items: bool = Field(
        False,
        description="Also publish malformed item records to the items DLQ. Off by default: the indexer owns that"
        " topic, and the trainer re-reads the compacted items topic from the start on every restart.",
    )
    max_poll_records: int = Field(2048, ge=1)
    poll_timeout_ms: int = Field(200, ge=0)
    max_partition_fetch_bytes: int = Field(
        8 << 20, ge=1 << 16, description="Bytes one fetch may return per partition (Kafka's default is 1 MiB)."
    )
    retry_backoff_max_seconds: float = Field(5.0, gt=0, description="Cap of the back-off after a Kafka error.")
    on_offset_out_of_range: Literal["fail", "earliest", "latest"] = Field(
        "fail",
        description="A stored offset outside the log: halt (default), or reset those partitions to the log start "
        "or end. Set a reset only for one deliberate start.",
    )

    # Training
    batch_size: int = Field(1024, ge=1, description="Impressions per train step (a poll's last one may be smaller).")
    lr: float = Field(3e-3, gt=0)
    max_grad_norm: float = Field(
        10.0, ge=0, description="Clip the gradient norm to this before each step (0: no clipping, still guarded)."
    )
    model_config_path: str | None = Field(None, description="JSON file holding an HSNNConfig; wins over the preset.")
    model_preset: Literal["tiny", "default"] = Field(
        "default", description="tiny: streaming.presets.tiny_hsnn_config(); default: HSNNConfig()."
    )
    holdout_one_in: int = Field(
        20, ge=0, description="An event whose event-id hash is 0 modulo this is held out for eval NE (0: none)."
    )
    eval_buffer_size: int = Field(4096, ge=1, description="Newest held-out events kept for the rolling NE.")
    eval_min_events: int = Field(
        50, ge=1, description="No NE (and so no gate) until the buffer has this many, with clicks and non-clicks."
    )
    seed: int = 0

    # Snapshots
    store_dir: str = "snapshots"
    keep_versions: int = Field(5, ge=1)
    max_ne_regression: float = Field(0.01, ge=0)
    snapshot_every_seconds: float = Field(300.0, gt=0)
    snapshot_every_events: int = Field(1_000_000, ge=1, description="Events consumed (any outcome) between snapshots.")

    # Operations
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus /metrics; 0 disables the server.")
    log_level: str = "INFO"
    heartbeat_max_age_s: float = Field(
        300.0, gt=0, description="/livez fails once the main loop has not turned for this long."
    )
    lease_ttl_s: float = Field(
        30.0, gt=0, description="A store lease not renewed for this long is free (the owner is presumed dead)."
    )
    lease_wait_s: float = Field(
        60.0, ge=0, description="How long a starting trainer waits for a held lease before refusing to start."
    )
    trained_ids_path: str | None = Field(
        None, description="Debug: append every trained event id to this file (exact across restarts)."
    )

    # Scale-out (trainer/distributed.py, docs/trainer.md "Several ranks")
    ranks: int = Field(
        1,
        ge=1,
        description="Launch this many ranks as one supervised group (`python -m trainer --ranks 2`); the group "
        "restarts from the last snapshot whenever a rank fails. 1: one process, no torch.distributed.",
    )
    world_size: int = Field(
        1, ge=1, description="Ranks in the group this process belongs to (falls back to torch's WORLD_SIZE)."
    )
    rank: int = Field(0, ge=0, description="This process's rank: owns partitions p with p % world_size == rank (RANK).")
    master_addr: str = Field("127.0.0.1", description="Rendezvous host of rank 0 (MASTER_ADDR).")
    master_port: int = Field(29500, ge=0, le=65535, description="Rendezvous port (MASTER_PORT; 0: the launcher picks).")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when CUDA is present, else gloo (CPU)."
    )
    dist_timeout_s: float = Field(300.0, gt=0, description="A collective waiting this long fails (the group restarts).")
    torch_threads: int = Field(0, ge=0, description="torch threads (0: torch's default; launched: cores // ranks).")
    compile_overarch: bool = Field(
        False,
        description="torch.compile each MoNN over-arch (most of a step's FLOPs): 1.04-1.17x faster steps on CPU in "
        "`python -m bench.train_step`, for 10-60 s of compiling at start-up; off: no measurable end-to-end gain here.",
    )
    max_group_restarts: int = Field(100, ge=0, description="Group restarts in a row without a snapshot, then give up.")
    replica_dump_dir: str | None = Field(
        None, description="Debug: at a clean stop every rank writes its weights here (rank<r>.safetensors)."
    )

    @model_validator(mode="before")
    @classmethod
    def _torch_launcher_env(cls, data: Any) -> Any:
        """torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT fill what HSNN_TRAINER_* did not set."""
        if not isinstance(data, dict):
            return data
        for field, env in (
            ("rank", "RANK"),
            ("world_size", "WORLD_SIZE"),
            ("master_addr", "MASTER_ADDR"),
            ("master_port", "MASTER_PORT"),
        ):
            if field not in data and env in os.environ:
                data = {**data, field: os.environ[env]}
        return data

    @model_validator(mode="after")
    def _rank_in_group(self) -> TrainerSettings:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of world_size {self.world_size}")
        return self

    def hsnn_config(self) -> HSNNConfig:
        if self.model_config_path:
            return HSNNConfig.model_validate(json.loads(Path(self.model_config_path).read_text()))
        if self.model_preset == "tiny":
            from streaming.presets import tiny_hsnn_config

            return tiny_hsnn_config()
        return HSNNConfig()
