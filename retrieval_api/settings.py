"""Settings of the retrieval API: `HSNN_API_*` environment variables or the "api" section of the config file."""

from __future__ import annotations

import logging
from typing import Annotated

import torch
from pydantic import Field

from hsnn.settings import ServiceSettings

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

    def resolved_device(self) -> str:
        """The device to serve on: "cuda" only when asked for and available, else "cpu" (logged)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            log.warning("device=cuda requested but no GPU is available; serving on cpu")
            return "cpu"
        return self.device
