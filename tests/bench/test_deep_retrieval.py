"""Deep Retrieval baseline: beam search, path assignment, the E-step penalty and planted recall."""

from __future__ import annotations

import pytest
import torch

from bench.deep_retrieval import (
    DeepRetrievalConfig,
    StructureModel,
    collect_pairs,
    encode_paths,
    train_deep_retrieval,
)
from hsnn.config import TowerConfig
from worlds.planted import SCHEMA, make_users, true_logits

SMALL_TOWER = TowerConfig(num_embed=1, dim=32, sparse_dim=8, hidden=[32], afm_attention_dim=8)


def small_config(**overrides) -> DeepRetrievalConfig:
    values = dict(
        num_codes=16,
        depth=2,
        paths_per_item=2,
        path_penalty=1e-3,
        beam_size=4,
        estep_beam=8,
        estep_candidates=8,
        user_tower=SMALL_TOWER,
        code_dim=8,
        layer_hidden=32,
        em_iterations=3,
        steps_per_mstep=40,
        batch_size=128,
        lr=1e-2,
        seed=0,
    )
    values.update(overrides)
    return DeepRetrievalConfig(**values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core box a second intra-op thread only adds spin-waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_users(world):
    """100 fresh users and the planted truth: each one's top-50 item ids by true logit."""
    users, segment = make_users(world, 100, seed=99)
    n = len(world.item_ids)
    pair_user = torch.arange(len(users)).repeat_interleave(n)
    rows = torch.arange(n).repeat(len(users))
    logits = true_logits(world, users, segment, rows, pair_user).view(len(users), n)
    return users, segment, world.item_ids[logits.topk(50, dim=1).indices]


@pytest.fixture(scope="module")
def dr_model(world, train_batches):
    return train_deep_retrieval(small_config(), SCHEMA, world.item_ids, train_batches, progress=False)


@pytest.fixture(scope="module")
def random_paths_model(world, train_batches):
    """The control: same model and step budget, but the random initial paths are never re-assigned."""
    config = small_config(em_iterations=0)
    return train_deep_retrieval(config, SCHEMA, world.item_ids, train_batches, steps=4 * 40, progress=False)


def recall_at_50(results, truth) -> float:
    hits = [len(set(ids.tolist()) & set(t.tolist())) / 50 for (ids, _), t in zip(results, truth, strict=True)]
    return sum(hits) / len(hits)


def test_beam_search_returns_valid_distinct_paths(world):
    torch.manual_seed(0)
    config = small_config(num_codes=4, depth=3)
    model = StructureModel(config, SCHEMA).eval()
    users, _ = make_users(world, 6, seed=5)
    with torch.no_grad():
        user_vec = model.encode_users(users)
        paths, scores, nodes, softmaxes = model.beam_search(user_vec, beam=5)
        assert paths.shape == (6, 5, 3) and scores.shape == (6, 5)
        assert paths.min() >= 0 and paths.max() < 4
        keys = encode_paths(paths, 4)
        assert all(len(set(row.tolist())) == 5 for row in keys)
        assert torch.all(scores[:, :-1] >= scores[:, 1:])
        exact = model.path_log_prob(user_vec.repeat_interleave(5, dim=0), paths.reshape(-1, 3)).view(6, 5)
        assert torch.allclose(scores, exact, atol=1e-5)
        # layer widths 1, 4, 5: that many K-way softmaxes per user
        assert softmaxes == 1 + 4 + 5 and nodes == softmaxes * 4
        # the best path by brute force over all 64 paths is the first one in the beam
        every = torch.cartesian_prod(*[torch.arange(4)] * 3)
        brute = model.path_log_prob(user_vec.repeat_interleave(64, dim=0), every.repeat(6, 1)).view(6, 64)
        assert torch.equal(encode_paths(every[brute.argmax(dim=1)], 4), keys[:, 0])
        # a beam wider than the whole space returns every path once
        small = StructureModel(small_config(num_codes=2, depth=2), SCHEMA).eval()
        all_paths, _, _, _ = small.beam_search(small.encode_users(users), beam=10)
        assert all_paths.shape == (6, 4, 2)
        assert all(len(set(row.tolist())) == 4 for row in encode_paths(all_paths, 2))


def test_every_item_has_j_distinct_paths_in_range(dr_model, world):
    config = dr_model.config
    assert dr_model.paths.shape == (len(world.item_ids), config.paths_per_item, config.depth)
    assert dr_model.paths.min() >= 0 and dr_model.paths.max() < config.num_codes
    keys = dr_model.path_keys()
    assert all(len(set(row.tolist())) == config.paths_per_item for row in keys)
    assert int(dr_model.path_sizes().sum()) == len(world.item_ids) * config.paths_per_item
    assert dr_model.occupied_paths().shape == (len(dr_model.path_sizes()), config.depth)
    assert [h["iteration"] for h in dr_model.history] == [0.0, 1.0, 2.0, 3.0]


def test_path_size_penalty_spreads_items(world):
    """Identical users want the same paths: without the penalty the E-step piles every item on them."""
    users, _ = make_users(world, 1, seed=3)
    pairs = [(users.select(torch.zeros(64, dtype=torch.long)), torch.arange(64))]
    ids = torch.arange(1, 65)
    base = dict(num_codes=4, depth=2, em_iterations=1, steps_per_mstep=20, estep_candidates=16, estep_beam=16)
    free = train_deep_retrieval(small_config(path_penalty=0.0, **base), SCHEMA, ids, pairs, progress=False)
    penalised = train_deep_retrieval(small_config(path_penalty=0.05, **base), SCHEMA, ids, pairs, progress=False)
    assert int(free.path_sizes().max()) == 64  # every item on the user's favourite path
    assert int(penalised.path_sizes().max()) <= 16  # 128 item-paths over 16 paths: near balanced
    assert len(penalised.path_sizes()) > len(free.path_sizes())


def test_em_beats_random_paths_on_planted_recall(dr_model, random_paths_model, eval_users):
    users, _, truth = eval_users
    learned, cost = dr_model.retrieve(users, k=50, beam=4)
    control, control_cost = random_paths_model.retrieve(users, k=50, beam=4)
    learned_recall, control_recall = recall_at_50(learned, truth), recall_at_50(control, truth)
    # measured: about 0.2 against 0.05, the chance level of 50 items drawn from 1200
    assert learned_recall > max(2 * control_recall, control_recall + 0.1), (learned_recall, control_recall)
    assert all(len(ids) <= 50 and torch.all(s[:-1] >= s[1:]) for ids, s in learned)
    # same beam, same structure-model cost: 1 + 4 softmaxes of 16 codes per user
    assert torch.all(cost.softmax_evals == 5) and torch.all(cost.nodes_scored == 80)
    assert torch.equal(cost.softmax_evals, control_cost.softmax_evals)
    assert torch.all(cost.items_collected > 0) and torch.all(cost.items_reranked == 0)
    # learned paths hold more items each; the control stays behind even when it collects as many
    wide, wide_cost = random_paths_model.retrieve(users, k=50, beam=16)
    assert wide_cost.items_collected.double().mean() >= cost.items_collected.double().mean()
    assert learned_recall > 2 * recall_at_50(wide, truth)


def test_rerank_with_a_scorer(dr_model, world, eval_users):
    users, segment, truth = eval_users

    def oracle(batch, pair_user, item_rows):
        return true_logits(world, batch, segment, item_rows, pair_user)

    plain, _ = dr_model.retrieve(users, k=50, beam=4)
    reranked, cost = dr_model.retrieve(users, k=50, beam=4, scorer=oracle)
    assert torch.equal(cost.items_reranked, cost.items_collected)
    assert recall_at_50(reranked, truth) >= recall_at_50(plain, truth)
    ids, scores = reranked[0]
    rows = ids - 1  # planted item ids are row + 1
    expected = true_logits(world, users, segment, rows, torch.zeros_like(rows))
    assert torch.allclose(scores, expected)


def test_training_and_retrieval_are_deterministic(world, train_batches, eval_users):
    users, _, _ = eval_users
    config = small_config(em_iterations=1, steps_per_mstep=10)
    runs = [train_deep_retrieval(config, SCHEMA, world.item_ids, train_batches[:10], progress=False) for _ in range(2)]
    assert torch.equal(runs[0].paths, runs[1].paths)
    (a, cost_a), (b, cost_b) = (run.retrieve(users, k=20, beam=3) for run in runs)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert torch.equal(cost_a.items_collected, cost_b.items_collected)


def test_collect_pairs_keeps_the_clicked_impressions(world, train_batches):
    users, rows = collect_pairs(train_batches[:3], world.item_ids)
    clicked = torch.cat([b.item_keys[b.labels[:, 0] > 0] for b in train_batches[:3]])
    assert len(users) == len(rows) == len(clicked)
    assert torch.equal(world.item_ids[rows], clicked)
