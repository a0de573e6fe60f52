"""Every preset builds, learns, and survives save/load bit-exactly; configs fail loudly."""

import json

import pytest
import torch
from pydantic import ValidationError

from hsnn.config import PRESETS, FeatureSchema, HSNNConfig, LTIConfig, MoNNConfig, TowerConfig, preset
from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.training import make_optimizer, monn_loss, train
from hsnn.weights import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model
from worlds.planted import SCHEMA, make_batches


@pytest.fixture(scope="module")
def small_batches(world):
    return make_batches(world, 4, 128, seed=11, users_per_batch=64)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_trains_and_round_trips(name, small_batches, tmp_path):
    torch.manual_seed(0)
    model = MoNN(preset(name), SCHEMA)
    probe = small_batches[0]
    # log loss only: the in-batch softmax scores clicks x candidates pairs, minutes for MoNN-Large on CPU
    with torch.no_grad():
        before = float(monn_loss(model, probe, retrieval_weight=0.0))
    optimizer = make_optimizer(model, lr=3e-3)
    for batch in small_batches * 6:
        optimizer.zero_grad()
        monn_loss(model, batch, retrieval_weight=0.0).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(monn_loss(model, probe, retrieval_weight=0.0))
    assert after < before * 0.95, (name, before, after)

    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, MoNN) and loaded.config == model.config
    for (key, a), (key_b, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert key == key_b and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(probe.users, probe.items), loaded(probe.users, probe.items))


def test_hsnn_with_default_level_presets_round_trips(small_batches, tmp_path):
    torch.manual_seed(0)
    config = HSNNConfig(features=SCHEMA, levels=[LTIConfig(num_nodes=8), LTIConfig(num_nodes=4)])
    model = HSNN(config)
    train(model, small_batches[:2])
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, HSNN) and int(loaded.step) == 2
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(small_batches[0]).logits, loaded(small_batches[0]).logits, strict=True):
            assert torch.equal(a, b)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["kind"] == "hsnn"
    assert (tmp_path / WEIGHTS_FILE).read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_load_refuses_unknown_format(tmp_path, small_batches):
    model = MoNN(preset("two_tower"), SCHEMA)
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unsupported model format"):
        load_model(tmp_path)


def test_bad_configs_are_rejected_with_a_reason():
    with pytest.raises(ValidationError, match="not an item sparse feature"):
        FeatureSchema.model_validate({**SCHEMA.model_dump(), "history_attributes": ["colour"]})
    with pytest.raises(ValidationError, match="index levels but"):
        HSNNConfig(features=SCHEMA, levels=[LTIConfig()], level_models=[])
    with pytest.raises(ValidationError, match="no interaction tower"):
        MoNNConfig(user=TowerConfig(), item=TowerConfig(), interaction=TowerConfig(), dot_product=True)
    with pytest.raises(ValidationError, match="Extra inputs"):
        LTIConfig.model_validate({"num_nodes": 8, "alpah_max": 3})
    with pytest.raises(KeyError, match="unknown MoNN preset"):
        preset("monn_huge")
