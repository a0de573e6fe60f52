"""Shared fixtures: a planted world and a briefly trained HSNN, built once per session."""

from __future__ import annotations

import pytest
import torch

from hsnn.model import HSNN
from hsnn.training import train
from worlds.planted import make_batches, make_world, tiny_hsnn_config


@pytest.fixture(scope="session")
def world():
    return make_world()


@pytest.fixture(scope="session")
def train_batches(world):
    return make_batches(world, 30, 256, seed=1, users_per_batch=64)


@pytest.fixture(scope="session")
def trained_hsnn(train_batches) -> HSNN:
    """An HSNN trained for a few hundred steps on the planted problem (shared, do not mutate)."""
    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4)))
    train(model, train_batches * 5)
    return model.eval()
