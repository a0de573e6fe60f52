"""The optional compiled over-arches must not change what a snapshot holds."""

from __future__ import annotations

import torch

from hsnn.config import HSNNConfig
from hsnn.model import HSNN
from trainer.settings import TrainerSettings
from trainer.startup import compile_overarches
from worlds.planted import SCHEMA


def test_compiling_keeps_the_state_dict_keys_and_values() -> None:
    model = HSNN(HSNNConfig(features=SCHEMA))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    compile_overarches(model)
    after = model.state_dict()
    assert list(after) == list(before)  # in place: no `_orig_mod.` prefixes that old snapshots would lack
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert all(m.overarch._compiled_call_impl is not None for m in [*model.level_models, model.item_model])


def test_compiling_is_off_by_default() -> None:
    assert TrainerSettings().compile_overarch is False
