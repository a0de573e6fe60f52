"""Learning To Index: schedule, assignment, gradient flow and the balance aids."""

import pytest
import torch

from hsnn.config import LTIConfig
from hsnn.lti import LearnedIndexLevel, ResidualIndex, squared_distances, temperature
from hsnn.metrics import index_health
from hsnn.model import HSNN
from hsnn.planted import make_batches, tiny_hsnn_config


def test_temperature_schedule_values():
    config = LTIConfig(alpha_max=10.0, alpha_min=0.5, schedule_steps=100, schedule_power=2.0)
    assert temperature(config, 0) == 0.5  # floored
    assert temperature(config, 50) == pytest.approx(2.5)  # 10 * 0.5^2
    assert temperature(config, 100) == pytest.approx(10.0)
    assert temperature(config, 1000) == pytest.approx(10.0)  # held at alpha_max
    linear = config.model_copy(update={"schedule_power": 1.0})
    assert temperature(linear, 30) == pytest.approx(3.0)
    off = config.model_copy(update={"use_temperature_schedule": False})
    assert temperature(off, 0) == temperature(off, 77) == 10.0


def test_hard_assignment_is_argmin_of_distances():
    torch.manual_seed(0)
    level = LearnedIndexLevel(6, LTIConfig(num_nodes=12))
    x = torch.randn(500, 6)
    brute = ((x[:, None, :] - level.codebook[None]) ** 2).sum(-1)
    assert torch.equal(level.assign(x), brute.argmin(dim=1))
    out = level.eval()(x, step=0)
    assert torch.equal(out.hard, brute.argmin(dim=1))
    torch.testing.assert_close(out.soft.sum(dim=1), torch.ones(500))
    torch.testing.assert_close(out.node_embedding, out.soft @ level.codebook)


def test_soft_assignment_sharpens_with_the_schedule():
    torch.manual_seed(0)
    level = LearnedIndexLevel(4, LTIConfig(num_nodes=8, schedule_steps=100))
    x = torch.randn(200, 4)
    early = level.eval()(x, step=1).soft.max(dim=1).values.mean()
    late = level(x, step=100).soft.max(dim=1).values.mean()
    assert late > early + 0.15


def test_residual_paths_and_embeddings():
    torch.manual_seed(0)
    index = ResidualIndex(5, [LTIConfig(num_nodes=4), LTIConfig(num_nodes=3)])
    v = torch.randn(50, 5)
    paths = index.assign(v)
    assert paths.shape == (50, 2) and int(paths[:, 1].max()) < 3
    first, second = index.path_embeddings(paths)
    torch.testing.assert_close(second - first, index.levels[1].codebook[paths[:, 1]])
    # level 2 quantises the residual the level-1 code leaves
    residual = v - index.levels[0].codebook[paths[:, 0]]
    assert torch.equal(paths[:, 1], squared_distances(residual, index.levels[1].codebook).argmin(dim=1))


def test_supervision_gradients_reach_codebook_and_item_tower(world):
    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config())
    batch = make_batches(world, 1, 64, seed=4)[0]
    losses = model(batch).losses
    (losses["item"] + losses["nodes"]).backward()
    for level in model.index.levels:
        assert level.codebook.grad is not None and level.codebook.grad.abs().sum() > 0
    item_tower_grads = [p.grad for p in model.item_model.item_tower.parameters() if p.grad is not None]
    assert item_tower_grads and sum(g.abs().sum() for g in item_tower_grads) > 0


def test_separate_index_learning_blocks_node_gradients_into_item_tower(world):
    torch.manual_seed(0)
    config = tiny_hsnn_config().model_copy(update={"use_joint_index": False})
    model = HSNN(config)
    batch = make_batches(world, 1, 64, seed=4)[0]
    model(batch).losses["nodes"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.item_model.item_tower.parameters())
    assert model.index.levels[0].codebook.grad.abs().sum() > 0


def _skewed_embeddings(n: int = 4000, dim: int = 8) -> torch.Tensor:
    """85% of the items in one tight cluster, the rest spread over seven others, all off-centre."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, dim, generator=g) * 3
    which = torch.where(torch.rand(n, generator=g) < 0.85, 0, torch.randint(1, 8, (n,), generator=g))
    return centres[which] + 0.5 * torch.randn(n, dim, generator=g) + 5.0


def _train_index(use_aids: bool, steps: int = 400) -> dict[str, float]:
    torch.manual_seed(0)
    config = LTIConfig(
        num_nodes=16,
        flops_weight=1.0,
        schedule_steps=steps,
        reseed_every=20,
        use_flops_regularizer=use_aids,
        use_dead_code_reseed=use_aids,
    )
    index = ResidualIndex(8, [config])
    x = _skewed_embeddings()
    optimizer = torch.optim.Adam(index.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        out = index(x[torch.randint(len(x), (256,), generator=g)], step)
        loss = out.reconstruction_loss + config.flops_weight * out.levels[0].flops_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        index.reseed_dead_codes(step + 1)
    return index_health(index.assign(x)[:, 0], 16)


def test_balance_aids_lower_node_size_max_over_mean_on_skewed_data():
    without = _train_index(use_aids=False)
    with_aids = _train_index(use_aids=True)
    assert with_aids["max_over_mean"] < 0.6 * without["max_over_mean"], (without, with_aids)
    assert with_aids["dead_nodes"] <= without["dead_nodes"]
    assert with_aids["entropy"] > without["entropy"]


def test_dead_codes_get_reseeded():
    torch.manual_seed(0)
    level = LearnedIndexLevel(4, LTIConfig(num_nodes=6, usage_ema_decay=0.5, dead_threshold=0.2))
    with torch.no_grad():
        level.codebook[3:] = 100.0  # far from every input: never chosen
    x = torch.randn(300, 4)
    for step in range(10):
        level.train()(x, step)
    dead = level.dead_nodes().tolist()
    assert dead == [3, 4, 5]
    assert level.reseed_dead_codes() == 3
    assert level.codebook[3:].abs().max() < 10  # moved onto the data
    assert len(level.dead_nodes()) == 0
    level(x, 11)
    assert set(level.assign(x).tolist()) & {3, 4, 5}  # and they now win some items


def test_reseeding_switch_off_leaves_codes_alone():
    level = LearnedIndexLevel(4, LTIConfig(num_nodes=6, use_dead_code_reseed=False, usage_ema_decay=0.5))
    with torch.no_grad():
        level.codebook[3:] = 100.0
    for step in range(10):
        level.train()(torch.randn(300, 4), step)
    assert level.reseed_dead_codes() == 0
    assert float(level.codebook.detach()[3:].min()) == 100.0


def test_kmeans_initialisation_places_codes_on_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres[torch.randint(3, (600,), generator=g)] + 0.1 * torch.randn(600, 2, generator=g)
    level = LearnedIndexLevel(2, LTIConfig(num_nodes=3, use_kmeans_init=True))
    level.train()(x, 0)
    nearest = squared_distances(centres, level.codebook.detach()).min(dim=1).values * 2
    assert float(nearest.max()) < 0.1


def test_flops_at_target_temperature_sees_a_collapse_the_early_soft_assignment_hides():
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 0.1
    losses = {}
    for target in (False, True):
        level = LearnedIndexLevel(4, LTIConfig(num_nodes=8, flops_at_target_temperature=target, flops_pool_batches=1))
        with torch.no_grad():
            level.codebook.copy_(torch.randn(8, 4) + 3.0)
            level.codebook[0] = 0.0  # every input is closest to code 0
        losses[target] = float(level.train()(x, step=0).flops_loss.detach())
    assert losses[False] < 2.0  # at alpha_min the soft assignment looks almost balanced (1 = perfect)
    assert losses[True] > 6.0  # at alpha_max it shows what argmin serves: nearly all in one of 8 nodes
