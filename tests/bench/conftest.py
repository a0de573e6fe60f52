"""Shared helpers for the benchmark-loader tests."""

from collections.abc import Callable

import pytest
import torch

from hsnn.config import HSNNConfig, LTIConfig
from hsnn.model import HSNN
from hsnn.training import make_optimizer, train_step
from worlds.planted import tiny_monn


def _one_hsnn_step(schema, batch) -> float:
    """The batch must go through the real model: one optimisation step on a tiny HSNN."""
    torch.manual_seed(0)
    config = HSNNConfig(
        features=schema,
        levels=[LTIConfig(num_nodes=4, schedule_steps=20)],
        level_models=[tiny_monn("level0")],
        item_model=tiny_monn("item"),
        index_warmup_steps=5,
    )
    model = HSNN(config)
    return train_step(model, batch, make_optimizer(model))["total"]


@pytest.fixture
def one_hsnn_step() -> Callable:
    return _one_hsnn_step
