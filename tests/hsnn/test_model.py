"""HSNN model details: warm-up, calibration, distillation, loss terms."""

import pytest
import torch

from bench.metrics import calibration
from bench.platt import fit_calibration, platt_fit
from hsnn.model import HSNN
from hsnn.training import predict
from worlds.planted import make_batches, tiny_hsnn_config


def test_index_warmup_is_linear_and_switchable():
    model = HSNN(tiny_hsnn_config())  # 50 warm-up steps
    assert model.index_warmup() == pytest.approx(1 / 50)
    model.step.fill_(24)
    assert model.index_warmup() == pytest.approx(0.5)
    model.step.fill_(500)
    assert model.index_warmup() == 1.0
    off = HSNN(tiny_hsnn_config().model_copy(update={"use_index_warmup": False}))
    assert off.index_warmup() == 1.0


def test_every_output_level_is_supervised(world):
    model = HSNN(tiny_hsnn_config(num_nodes=(4, 4, 2)).model_copy(update={"use_index_warmup": False}))
    batch = make_batches(world, 1, 32, seed=3)[0]
    out = model(batch)
    assert len(out.logits) == 4  # three index levels + the item level
    expected = sum(model.task_loss(logits, batch.labels) for logits in out.logits[:-1])
    torch.testing.assert_close(out.losses["nodes"], expected)
    assert {"item", "nodes", "flops", "reconstruction", "node_ranking", "retrieval", "total"} <= set(out.losses)


def test_distillation_term_uses_soft_labels(world):
    model = HSNN(tiny_hsnn_config().model_copy(update={"distillation_weight": 0.5}))
    batch = make_batches(world, 1, 32, seed=3)[0]
    assert "distillation" not in model(batch).losses
    batch.soft_labels = torch.full_like(batch.labels, 0.3)
    assert float(model(batch).losses["distillation"].detach()) > 0


def test_calibration_fixes_a_biased_model(trained_hsnn, world):
    held_out = make_batches(world, 2, 512, seed=8, users_per_batch=128)
    model = HSNN(trained_hsnn.config)
    model.load_state_dict(trained_hsnn.state_dict())
    with torch.no_grad():
        model.ensemble.bias[-1] += 1.5  # over-predict on purpose
    before = calibration(predict(model, held_out[1])[:, 0], held_out[1].labels[:, 0])
    fit_calibration(model, held_out[0])
    after = calibration(predict(model, held_out[1])[:, 0], held_out[1].labels[:, 0])
    assert before > 1.3
    assert abs(after - 1) < 0.15 < abs(before - 1)
    assert bool((model.calibration_scale > 0).all())


def test_fixed_paths_train_on_a_given_index(world):
    """Other index builders (hierarchy, k-means, EM) hand HSNN hard paths; codes still learn."""
    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config(num_nodes=(4, 2)))
    batch = make_batches(world, 1, 32, seed=3)[0]
    batch.item_paths = torch.stack([torch.arange(32) % 4, torch.arange(32) % 2], dim=1)
    out = model(batch)
    expected = model.index.path_embeddings(batch.item_paths)[0]
    node_input = model.level_models[0].project_nodes(expected)
    assert node_input.shape[0] == 32
    out.losses["nodes"].backward()
    used = model.index.levels[0].codebook.grad.abs().sum(dim=1)
    assert bool((used > 0).all())  # every code of level 0 appears in the given paths
    assert float(out.losses["flops"]) == 0.0


def test_platt_fit_recovers_scale_and_falls_back_to_the_base_rate():
    torch.manual_seed(0)
    true_logits = torch.randn(20_000) - 4.0
    labels = (torch.rand(20_000) < torch.sigmoid(true_logits)).float()
    # the model's logits are the truth stretched 3x and shifted: Platt undoes it
    scale, shift = platt_fit(3 * true_logits - 2, labels, iterations=50)
    assert scale == pytest.approx(1 / 3, rel=0.15) and shift == pytest.approx(2 / 3, abs=0.4)
    # logits ranking the data backwards: the map stays increasing and predicts about the base rate
    scale, shift = platt_fit(-true_logits, labels, iterations=50)
    assert scale == pytest.approx(1e-3)
    assert float(torch.sigmoid(-true_logits * scale + shift).mean()) == pytest.approx(float(labels.mean()), rel=0.05)
