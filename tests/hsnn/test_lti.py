"""Learning To Index: schedule, assignment, gradient flow and the balance aids."""

import math

import pytest
import torch

from hsnn.config import LTIConfig
from hsnn.lti import LearnedIndexLevel, ResidualIndex, squared_distances, temperature
from hsnn.metrics import index_health
from hsnn.model import HSNN
from worlds.planted import make_batches, tiny_hsnn_config


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


def _train_index(steps: int = 200, **lti) -> tuple[ResidualIndex, torch.Tensor]:
    """A two-level index trained on the skewed set by reconstruction alone (the codebook's own pull)."""
    torch.manual_seed(0)
    configs = [LTIConfig(num_nodes=n, schedule_steps=steps // 2, **lti) for n in (16, 4)]
    index = ResidualIndex(8, configs)
    x = _skewed_embeddings(2000)
    optimizer = torch.optim.Adam(index.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    index.train()
    for step in range(steps):
        if step == 20:  # as HSNN.forward does: seed, then re-price every 50 steps, before the step's forward
            index.seed_with_kmeans()
        if step >= 20 and step % 50 == 0:
            index.rebalance(capacity_factor=1.5)
        out = index(x[torch.randint(len(x), (256,), generator=g)], step)
        loss = out.reconstruction_loss + sum(level.flops_loss for level in out.levels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        index.reseed_dead_codes(step + 1)
    return index, x


def _within_cap(level: dict[str, float], items: int, factor: float = 2.0) -> bool:
    """A cap of factor x mean allows ceil(factor * items / nodes) items in a node."""
    mean = items / level["nodes"]
    return round(level["max_over_mean"] * mean) <= math.ceil(factor * mean)


def _health_per_level(paths: torch.Tensor, sizes: list[int]) -> list[dict[str, float]]:
    keys, out, nodes = torch.zeros(len(paths), dtype=torch.long), [], 1
    for level, size in enumerate(sizes):
        keys, nodes = keys * size + paths[:, level], nodes * size
        out.append(index_health(keys, nodes))
    return out


def test_balance_prices_use_every_node_evenly_on_skewed_data():
    plain, x = _train_index(
        use_balance_prices=False, use_kmeans_init=False, use_ema_codebook=False, use_dead_code_reseed=False
    )
    priced, _ = _train_index(use_balance_prices=True)
    without = _health_per_level(plain.assign(x), [16, 4])
    with_prices = _health_per_level(priced.assign(x), [16, 4])
    # the trained per-item rule, before any build-time cap: every node used, far flatter than without prices
    for level, plain_level in zip(with_prices, without, strict=True):
        assert level["used_nodes"] == level["nodes"], with_prices
        assert level["max_over_mean"] < 0.25 * plain_level["max_over_mean"], (without, with_prices)
    built = _health_per_level(priced.assign_with_capacity(x, capacity_factor=2.0), [16, 4])
    for level in built:  # and after the build-time cap, every level within 2x its mean
        assert _within_cap(level, len(x)), built
    assert built[0]["used_nodes"] == 16 and built[1]["used_nodes"] >= 0.9 * 64, built


@pytest.mark.parametrize("trained", [False, True])
def test_build_time_cap_holds_for_any_input_and_assign_reproduces_it(trained):
    if trained:
        index, x = _train_index(use_balance_prices=False)
    else:  # a random codebook on skewed data: argmin puts nearly everything in one node
        torch.manual_seed(3)
        index, x = ResidualIndex(8, [LTIConfig(num_nodes=16), LTIConfig(num_nodes=4)]), _skewed_embeddings(2000)
    paths = index.assign_with_capacity(x, capacity_factor=2.0)
    for level in _health_per_level(paths, [16, 4]):
        assert _within_cap(level, len(x)), level
    # the raised prices make the per-item rule give the capped paths (a row the auction could not place by
    # price alone is the exception): build, training and deltas agree
    assert (index.assign(x) == paths).all(dim=1).float().mean() >= 0.99


def test_stop_gradient_keeps_reconstruction_and_flops_out_of_the_item_tower(world):
    torch.manual_seed(0)
    lti = {"use_flops_regularizer": True}
    model = HSNN(tiny_hsnn_config(**lti).model_copy(update={"use_index_warmup": False, "commitment_weight": 0.0}))
    assert model.config.index_stop_gradient
    losses = model.train()(make_batches(world, 1, 64, seed=4)[0]).losses
    (losses["reconstruction"] + losses["flops"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.item_model.item_tower.parameters())
    assert model.index.levels[0].codebook.grad.abs().sum() > 0


def test_without_stop_gradient_the_index_does_reach_the_item_tower(world):
    torch.manual_seed(0)
    config = tiny_hsnn_config(use_flops_regularizer=True).model_copy(
        update={"use_index_warmup": False, "index_stop_gradient": False}
    )
    model = HSNN(config)
    losses = model.train()(make_batches(world, 1, 64, seed=4)[0]).losses
    (losses["nodes"] + losses["flops"]).backward()
    assert sum(p.grad.abs().sum() for p in model.item_model.item_tower.parameters() if p.grad is not None) > 0


@pytest.fixture(scope="module")
def hardened_hsnn(world):
    """An HSNN trained past its schedule, so training uses the hard (serving) node."""
    from hsnn.training import train

    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config(num_nodes=(8, 4), schedule_steps=30).model_copy(update={"index_warmup_steps": 20}))
    train(model, make_batches(world, 45, 128, seed=11, users_per_batch=32))
    return model.eval()


def test_training_hard_path_equals_the_serving_path_for_every_item(hardened_hsnn, world):
    from hsnn.index import build_index, encode_catalog

    model = hardened_hsnn
    index = build_index(model, world.item_ids, world.items)  # capped build: may raise prices
    vectors = encode_catalog(model, world.items).flatten(1)
    out = model.index.eval()(vectors, int(model.step))  # what HSNN.forward computes for these items
    training_paths = torch.stack([level.hard for level in out.levels], dim=1)
    assert torch.equal(training_paths, index.paths)
    # and the node embedding training feeds the level models is the serving node's
    for level_idx, level in enumerate(index.levels):
        torch.testing.assert_close(out.node_embeddings[level_idx], level.embedding[index.item_nodes[:, level_idx]])


def test_level_model_inputs_match_between_training_and_serving(hardened_hsnn, world):
    from hsnn.index import build_index
    from hsnn.serving import score_nodes

    model = hardened_hsnn
    index = build_index(model, world.item_ids, world.items)
    batch = make_batches(world, 1, 64, seed=21)[0]
    rows = torch.searchsorted(world.item_ids, batch.item_keys)
    with torch.no_grad():
        vectors = model.item_model.encode_items(batch.items).flatten(1)
        out = model.index(vectors, int(model.step))
        for level_idx, level_model in enumerate(model.level_models):
            user_emb = level_model.encode_users(batch.users)
            trained = level_model.pair_logits(user_emb, level_model.project_nodes(out.node_embeddings[level_idx]), None)
            served = score_nodes(
                level_model, level_idx, index, user_emb, torch.arange(len(batch)), index.item_nodes[rows, level_idx]
            )
            torch.testing.assert_close(trained, served)


def test_dead_codes_get_reseeded():
    torch.manual_seed(0)
    config = LTIConfig(
        num_nodes=6, usage_ema_decay=0.5, dead_threshold=0.2, use_dead_code_reseed=True, use_balance_prices=False
    )
    level = LearnedIndexLevel(4, config)
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
    index = ResidualIndex(2, [LTIConfig(num_nodes=3, use_kmeans_init=True)])
    index.train()(x, 0)  # the forward keeps recent inputs; seeding clusters them
    assert index.seed_with_kmeans()
    nearest = squared_distances(centres, index.levels[0].codebook.detach()).min(dim=1).values * 2
    assert float(nearest.max()) < 0.1


def test_flops_at_target_temperature_sees_a_collapse_the_early_soft_assignment_hides():
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 0.1
    losses = {}
    for target in (False, True):
        config = LTIConfig(
            num_nodes=8, use_flops_regularizer=True, flops_at_target_temperature=target, flops_pool_batches=1
        )
        level = LearnedIndexLevel(4, config)
        with torch.no_grad():
            level.codebook.copy_(torch.randn(8, 4) + 3.0)
            level.codebook[0] = 0.0  # every input is closest to code 0
        losses[target] = float(level.train()(x, step=0).flops_loss.detach())
    assert losses[False] < 2.0  # at alpha_min the soft assignment looks almost balanced (1 = perfect)
    assert losses[True] > 6.0  # at alpha_max it shows what argmin serves: nearly all in one of 8 nodes


@pytest.fixture(scope="module")
def profile_hsnn(world):
    """An HSNN whose index clusters score profiles over probe users."""
    from hsnn.training import train

    torch.manual_seed(0)
    config = tiny_hsnn_config(num_nodes=(8, 4), schedule_steps=30).model_copy(
        update={"index_warmup_steps": 20, "index_input": "score_profile", "probe_users": 16}
    )
    model = HSNN(config)
    train(model, make_batches(world, 30, 128, seed=11, users_per_batch=32))
    return model.eval()


def test_score_profile_probes_are_drawn_once_and_saved_with_the_weights(profile_hsnn, world, tmp_path):
    from hsnn.index import encode_catalog
    from hsnn.weights import load_model, save_model

    model = profile_hsnn
    assert bool(model.probes.captured)
    history = model.probes.history_item_id.clone()
    assert bool((history > 0).any()), "probes carry real engagement histories (their I2IF is the profile's signal)"
    items = world.items.select(torch.arange(200))
    embeddings = encode_catalog(model, items)
    profiles = model.index_vectors(embeddings, items)
    assert profiles.shape == (200, 16)
    assert profiles.std(dim=0).min() > 0, "every probe tells items apart"
    save_model(model, tmp_path)
    restored = load_model(tmp_path)
    assert torch.equal(restored.probes.history_item_id, history)
    assert torch.allclose(restored.index_vectors(encode_catalog(restored, items), items), profiles, atol=1e-5)


def test_score_profile_training_reads_what_the_build_assigns(profile_hsnn, world):
    """The index input of a training forward equals `index_vectors` over the catalogue (one function)."""
    from hsnn.index import encode_catalog

    model = profile_hsnn
    batch = make_batches(world, 1, 64, seed=5)[0]
    seen = {}
    original = model.index.forward

    def spy(v, step):
        seen["input"] = v
        return original(v, step)

    model.index.forward = spy
    try:
        model(batch)
    finally:
        del model.index.forward
    rows = world.item_ids.new_tensor([int(i) - 1 for i in batch.items.sparse["item_id"]])
    items = world.items.select(rows)
    assert torch.allclose(seen["input"], model.index_vectors(encode_catalog(model, items), items), atol=1e-5)


@pytest.fixture(scope="module")
def member_mean_hsnn(world):
    """Score-profile index whose level models read each node's member-mean item embedding."""
    from hsnn.training import train

    torch.manual_seed(0)
    config = tiny_hsnn_config(num_nodes=(8, 4), schedule_steps=30).model_copy(
        update={
            "index_warmup_steps": 20,
            "index_input": "score_profile",
            "probe_users": 16,
            "node_input": "member_mean",
        }
    )
    model = HSNN(config)
    train(model, make_batches(world, 30, 128, seed=11, users_per_batch=32))
    return model.eval()


def test_member_mean_node_input_is_what_serving_reads_and_is_saved(member_mean_hsnn, world, tmp_path):
    """Level models read the same member-mean row for a node in training and in the built index."""
    from hsnn.index import build_index
    from hsnn.weights import load_model, save_model

    model = member_mean_hsnn
    index = build_index(model, world.item_ids, world.items, capacity_factor=None)
    keys = model.node_means.keys(index.paths)
    for level, level_model in enumerate(model.level_models):
        seen = model.node_means.seen(level)[keys[level]] > 0
        assert bool(seen.any()), "training reached some nodes"
        training_input = level_model.project_nodes(model.node_means.vectors(level, keys[level]))  # (N, n, d)
        served = index.levels[level].projected[index.item_nodes[:, level]]
        assert torch.allclose(served[seen], training_input[seen], atol=1e-6)
        # a node no training row reached reads its members' catalogue mean
        unseen_nodes = torch.unique(index.item_nodes[~seen, level])
        for node in unseen_nodes.tolist()[:3]:
            members = index.item_embeddings[index.item_nodes[:, level] == node].flatten(1).mean(dim=0)
            expected = level_model.project_nodes(members.unsqueeze(0))[0]
            assert torch.allclose(index.levels[level].projected[node], expected, atol=1e-5)
    save_model(model, tmp_path)
    restored = load_model(tmp_path)
    for level in range(model.num_levels):
        assert torch.equal(restored.node_means.means(level), model.node_means.means(level))


def test_member_means_follow_their_members():
    """One update sets an unseen node to its batch mean; later updates are an EMA; other nodes stay."""
    from hsnn.model import NodeMeans

    means = NodeMeans([2, 3], dim=2, decay=0.5)
    paths = torch.tensor([[0, 1], [0, 1], [1, 2]])
    vectors = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    keys = means.keys(paths)
    assert keys[1].tolist() == [1, 1, 5]
    means.update(keys, vectors)
    assert means.means(0)[0].tolist() == [2.0, 0.0] and means.means(1)[5].tolist() == [0.0, 4.0]
    means.update(keys[:1] + keys[1:], torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 0.0]]))
    assert means.means(0)[0].tolist() == [3.5, 0.0]  # 0.5 * 2 + 0.5 * 5
    assert means.seen(1).tolist() == [0, 4, 0, 0, 0, 2]


def test_learned_node_rows_start_at_the_member_mean_and_are_trained_by_the_level_losses(world):
    """node_input="learned": the table is a parameter; the level losses move its rows after the first
    sighting, and the built index reads those rows."""
    from hsnn.index import build_index
    from hsnn.training import make_optimizer, train_step

    torch.manual_seed(0)
    config = tiny_hsnn_config(num_nodes=(4, 2), schedule_steps=10).model_copy(
        update={"index_warmup_steps": 4, "node_input": "learned"}
    )
    model = HSNN(config)
    table = model.node_means.means(0)
    assert isinstance(table, torch.nn.Parameter)
    batches = make_batches(world, 6, 64, seed=3)
    optimizer = make_optimizer(model)
    train_step(model, batches[0], optimizer)
    before = table.detach().clone()
    train_step(model, batches[1], optimizer)
    seen = model.node_means.seen(0) > 0
    assert not torch.equal(table.detach()[seen], before[seen]), "gradient moved the rows"
    model.eval()
    index = build_index(model, world.item_ids, world.items, capacity_factor=None)
    keys = model.node_means.keys(index.paths)[0]
    reached = model.node_means.seen(0)[keys] > 0
    expected = model.level_models[0].project_nodes(model.node_means.vectors(0, keys).detach())
    assert torch.allclose(index.levels[0].projected[index.item_nodes[:, 0]][reached], expected[reached], atol=1e-6)


def test_learned_node_rows_are_residuals_on_their_parents():
    """A leaf's vector is its row plus its parent's; a fresh leaf row starts at its members' mean minus the parent."""
    from hsnn.model import NodeMeans

    table = NodeMeans([2, 2], dim=1, decay=0.9, learned=True)
    paths = torch.tensor([[1, 0], [1, 1], [1, 1]])
    table.update(table.keys(paths), torch.tensor([[2.0], [4.0], [6.0]]))
    assert table.means(0).data[1].item() == 4.0  # level-1 node 1: mean of all three
    assert table.means(1).data[3].item() == 1.0 and table.means(1).data[2].item() == -2.0
    assert table.vectors(1, torch.tensor([2, 3])).flatten().tolist() == [2.0, 5.0]  # the leaves' own means
    table.update(table.keys(paths), torch.tensor([[9.0], [9.0], [9.0]]))
    assert table.means(0).data[1].item() == 4.0, "after the first sighting only gradients move a learned row"
