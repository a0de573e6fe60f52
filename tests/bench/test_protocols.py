"""Evaluation protocols on tiny hand-made fixtures, with recall and NDCG worked out by hand.

Every fixture is ranked by one fixed scorer: an item's score is its feature id, so the ranking of a
user is "highest id first, masked items skipped" and each held-out item's rank can be read off.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.__main__ import main
from bench.data import gowalla_data, movielens_data, simulator_data, stream_positions
from bench.datasets.movielens import GENRES, load_movielens, ratio_parts
from bench.harness import BenchData, SweepPoint, evaluate, full_ranking_retriever, rank_users
from bench.index_quality import level_health, min_cover_cost, oracle_cost
from bench.methods_mf import MFSoftmaxConfig, in_batch_softmax_loss, train_mf_softmax
from bench.metrics import ndcg_at_k, recall_at_k


def gain(rank: int) -> float:
    """DCG gain of a hit at 1-based `rank`."""
    return 1 / math.log2(rank + 1)


def ideal(hits: int) -> float:
    return sum(gain(r) for r in range(1, hits + 1))


def id_scorer(data: BenchData, vectorised: bool = True) -> SweepPoint:
    """Score = item feature id, the same for every user."""

    def score_all(users) -> torch.Tensor:
        return data.item_ids.float().expand(len(users), -1).clone()  # (U, N)

    retriever = full_ranking_retriever(score_all, data)
    return SweepPoint("by_id", "all", retriever, score_all=score_all if vectorised else None)


def metrics(data: BenchData, k_values: tuple[int, ...]) -> dict:
    return evaluate(id_scorer(data), data, {}, k_values=k_values, latency_users=1)


def test_ndcg_uses_the_ideal_dcg_of_min_relevant_and_k():
    # user 1: hits at ranks 1 and 3 of 3 relevant; user 2: no hit; user 3: nothing relevant (skipped)
    retrieved = [[1, 9, 2, 8], [7, 6, 5, 4], [1, 2, 3, 4]]
    relevant = [{1, 2, 3}, {11}, set()]
    assert ndcg_at_k(retrieved, relevant, 2) == pytest.approx((gain(1) / ideal(2) + 0) / 2)
    assert ndcg_at_k(retrieved, relevant, 4) == pytest.approx(((gain(1) + gain(3)) / ideal(3) + 0) / 2)
    assert recall_at_k(retrieved, relevant, 4) == pytest.approx((2 / 3 + 0) / 2)


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def gowalla_root(tmp_path: Path) -> Path:
    """8 items (file ids 0..7, feature ids 1..8), 3 users; official test.txt kept outside the folder."""
    root = tmp_path / "gowalla"
    root.mkdir()
    write_lines(root / "train.txt", ["0 0 1 2", "1 3 4", "2 5"])
    write_lines(root / "valid.txt", ["0 3", "1 5 6", "2 7"])
    write_lines(tmp_path / "test.txt", ["0 4 5 6", "1 7", "2 0 1"])
    return root


def test_gowalla_valid_protocol_hand_computed(gowalla_root: Path):
    data = gowalla_data(gowalla_root, None, protocol="valid")
    assert data.relevant == [{4}, {6, 7}, {8}]  # valid.txt as feature ids
    assert [sorted(e.tolist()) for e in data.exclude] == [[1, 2, 3], [4, 5], [6]]  # train.txt masked
    result = metrics(data, (2, 5))
    # ranking 7,6,5,4,3,... minus masked items: u0 valid 3 at rank 5; u1 valid {5, 6} at ranks 3, 2; u2 7 at 1
    assert result["recall@2"] == pytest.approx((0 + 1 / 2 + 1) / 3)
    assert result["ndcg@2"] == pytest.approx((0 + gain(2) / ideal(2) + 1) / 3)
    assert result["recall@5"] == pytest.approx(1.0)
    assert result["ndcg@5"] == pytest.approx((gain(5) + (gain(2) + gain(3)) / ideal(2) + 1) / 3)


def test_gowalla_official_protocol_hand_computed(gowalla_root: Path, tmp_path: Path):
    data = gowalla_data(gowalla_root, None, test_path=tmp_path / "test.txt", protocol="official")
    assert data.name == "gowalla_official" and len(data.relevant) == 3  # every user with test items
    # train + valid are the training set, so both are masked
    assert [sorted(e.tolist()) for e in data.exclude] == [[1, 2, 3, 4], [4, 5, 6, 7], [6, 8]]
    result = metrics(data, (2, 5))
    # u0 test {4,5,6} at ranks 4,3,2; u1 test 7 at rank 1; u2 test {0,1} at ranks 6,5
    assert result["recall@2"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert result["ndcg@2"] == pytest.approx((gain(2) / ideal(2) + 1 + 0) / 3)
    assert result["recall@5"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert result["ndcg@5"] == pytest.approx(((gain(2) + gain(3) + gain(4)) / ideal(3) + 1 + gain(5) / ideal(2)) / 3)
    with pytest.raises(ValueError, match="official test"):
        gowalla_data(gowalla_root, None, protocol="official")


def test_vectorised_and_retriever_rankings_agree(gowalla_root: Path):
    data = gowalla_data(gowalla_root, None, protocol="valid")
    vectorised, _ = rank_users(id_scorer(data), data, 5, progress=False)
    asked, _ = rank_users(id_scorer(data, vectorised=False), data, 5, progress=False)
    assert vectorised == asked == [[8, 7, 6, 5, 4], [8, 7, 6, 3, 2], [8, 7, 5, 4, 3]]


def movielens_tables(tmp_path: Path):
    """12 movies; user 1: ten positives, user 2: three, user 3: two, user 4: one; low ratings dropped."""
    ratings = [(1, item, 4 + item % 2, 1000 + 10 * (11 - item)) for item in range(10, 0, -1)]  # newest = item 1
    ratings += [(1, 11, 2, 5000), (2, 1, 5, 10), (2, 2, 4, 20), (2, 3, 4, 30), (2, 12, 1, 40)]
    ratings += [(3, 4, 4, 10), (3, 5, 5, 20), (4, 6, 4, 10)]
    root = tmp_path / "ml"
    root.mkdir()
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (root / "u.user").write_text("".join(f"{u}|30|M|other|1000{u}\n" for u in range(1, 5)))
    flags = "|".join(["0"] * (len(GENRES) - 1) + ["1"])
    (root / "u.item").write_text("".join(f"{i}|Film {i}|01-Jan-1995||x|{flags}\n" for i in range(1, 13)))
    return root


def test_recbole_split_counts_follow_its_rounding():
    for n, expected in [(1, [1, 0, 0]), (2, [1, 0, 1]), (3, [1, 1, 1]), (10, [8, 1, 1]), (19, [17, 1, 1]),
                        (20, [16, 2, 2])]:  # fmt: skip
        parts = ratio_parts(np.zeros(n, dtype=np.int64), 1)
        assert np.bincount(parts, minlength=3).tolist() == expected
        assert (np.diff(parts) >= 0).all()  # train first, test last, in the given order


def test_movielens_recbole_protocol_hand_computed(tmp_path: Path):
    root = movielens_tables(tmp_path)
    data = movielens_data(root, None, protocol="recbole")
    # user 1 (time order: items 10, 9, ..., 1): train 10..3, valid 2, test 1; user 2: train 1, valid 2,
    # test 3; user 3: train 4, test 5; user 4 has no test item and is not evaluated
    assert data.relevant == [{1}, {3}, {5}]
    assert [sorted(e.tolist()) for e in data.exclude] == [list(range(2, 11)), [1, 2], [4]]
    result = metrics(data, (3, 10))
    # ranking 12, 11, 10, ... minus masked: u1 -> 12, 11, 1 (rank 3); u2 -> 12..4, 3 (rank 10); u3 -> 5 at rank 8
    assert result["recall@3"] == pytest.approx(1 / 3)
    assert result["ndcg@3"] == pytest.approx(gain(3) / 3)
    assert result["recall@10"] == pytest.approx(1.0)
    assert result["ndcg@10"] == pytest.approx((gain(3) + gain(10) + gain(8)) / 3)
    # the random order (RecBole's RO) keeps the counts but picks other items for user 1
    shuffled = load_movielens(root, split="recbole", split_order="random", seed=1)
    assert shuffled.eval.counts().tolist() == [1, 1, 1, 0] and shuffled.valid.counts().tolist() == [1, 1, 0, 0]


def test_movielens_newest20_protocol_still_available(tmp_path: Path):
    data = movielens_data(movielens_tables(tmp_path), None, protocol="newest20")
    assert data.name == "movielens_newest20"
    assert data.relevant == [{1, 2}]  # only user 1 has >= 5 positives; newest floor(0.2 * 10) = 2 held out


def test_simulator_stream_continues_instead_of_replaying():
    assert stream_positions(10, 4, batch_seed=7, base_seed=7) == [0, 1, 2, 3]
    assert stream_positions(10, 4, batch_seed=8, base_seed=7) == [4, 5, 6, 7]  # the next phase continues
    assert stream_positions(10, 4, batch_seed=9, base_seed=7) == [8, 9, 0, 1]  # wraps only past the end
    data = simulator_data(300, 500, 4, train_batches=6, batch_size=32, seed=3)
    whole = list(data.batches(6, 3))
    first, second = list(data.batches(3, 3)), list(data.batches(3, 4))
    assert all(a is b for a, b in zip(first + second, whole, strict=True))
    assert not any(a is b for a in first for b in second)  # no batch of phase 1 is replayed in phase 2


def test_level_health_covers_every_level_and_counts_prefix_nodes():
    # 2 x 3 codebooks: level 1 uses both codes; level 2 uses 3 of the 6 possible prefixes
    index = SimpleNamespace(item_nodes=torch.tensor([[0, 0], [0, 0], [0, 1], [1, 2], [1, 2], [1, 2]]),
                            codebook_sizes=[2, 3])  # fmt: skip
    top, leaves = level_health(index)
    assert (top["used_nodes"], top["nodes"], top["max_over_mean"]) == (2, 2, 1.0)
    assert (leaves["used_nodes"], leaves["nodes"]) == (3, 6)
    assert leaves["max_over_mean"] == pytest.approx(3 / (6 / 6))


def test_oracle_cost_is_the_exact_minimum_cover():
    # need 5 wanted items: leaf A (3 of them, size 3) + leaf C (2, size 2) = 5 beats greedy-by-count B (4, size 40)
    assert min_cover_cost(np.array([3, 4, 2]), np.array([3, 40, 2]), 5) == 5
    assert min_cover_cost(np.array([1]), np.array([10]), 2) == math.inf
    # index of 6 items in leaves {0,1}, {2,3,4}, {5}; a user's true top-4 = items 0, 2, 5, 3 -> half = 2 items
    index = SimpleNamespace(item_nodes=torch.tensor([[0], [0], [1], [1], [1], [2]]), num_items=6)
    cost = oracle_cost(index, torch.tensor([[0, 2, 5, 3]]), top=4)
    assert cost["mean"] == 3  # leaf {2, 3, 4} alone, or leaves {0, 1} + {5}: 3 items either way


def test_in_batch_softmax_masks_repeated_items_and_corrects_by_log_q():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    rows = torch.tensor([0, 1, 0])  # rows 0 and 2 hold the same item
    log_q = torch.log(torch.tensor([0.5, 0.5]))
    loss = in_batch_softmax_loss(users, items, rows, log_q, temperature=1.0)
    logits = users @ items.T - log_q[rows][None, :]
    expected = []
    for b in range(3):
        keep = [j for j in range(3) if j == b or rows[j] != rows[b]]
        expected.append(-(logits[b, b] - torch.logsumexp(logits[b, keep], 0)))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)


def test_mf_softmax_learns_two_user_groups():
    # users 0..9 interact with items 0..4, users 10..19 with items 5..9
    users = torch.arange(20).repeat_interleave(5)
    items = torch.cat([torch.arange(5) if u < 10 else torch.arange(5, 10) for u in range(20)])
    config = MFSoftmaxConfig(dim=8, batch_size=16, epochs=30, learning_rate=0.05, seed=0)
    model, _ = train_mf_softmax((users, items), 20, 10, config, progress=False)
    with torch.no_grad():
        scores = model.user_vectors(torch.tensor([0, 15])) @ model.item_vectors().T  # (2, 10)
    assert set(scores[0].topk(5).indices.tolist()) == set(range(5))
    assert set(scores[1].topk(5).indices.tolist()) == set(range(5, 10))


def test_seeded_quick_run_reports_spread_health_per_level_and_oracle_cost(tmp_path: Path):
    torch.set_num_threads(1)
    argv = ["--dataset", "planted", "--quick", "--items", "400", "--steps", "6", "--eval-users", "6"]
    main([*argv, "--builders", "joint,kmeans", "--seeds", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "planted.json").read_text())
    assert report["seeds"] == [0, 1]
    for point in report["points"]:
        assert 0.0 <= point["ndcg@100"] <= 1.0 and point["recall@100_std"] >= 0.0
    for name in ("hsnn_joint", "hsnn_kmeans"):
        assert len(report["index_health"][name]) == 2  # one entry per level
        assert report["oracle_cost"][name]["mean"] > 0 and "mean_std" in report["oracle_cost"][name]
    text = (tmp_path / "planted.md").read_text()
    assert " ± " in text and "| hsnn_kmeans | 2 |" in text and "Oracle cost" in text


@pytest.mark.parametrize("negatives", [0, 1])
def test_training_negatives_change_batches_but_not_the_ne_impressions(gowalla_root: Path, negatives: int):
    data = gowalla_data(gowalla_root, None, protocol="valid", batch_size=4, negatives=negatives)
    batch = next(iter(data.batches(1, 0)))
    labels = batch.labels[:, 0]
    # block layout: every positive followed by its `negatives` sampled rows
    assert labels.tolist() == ([1.0] + [0.0] * negatives) * (len(labels) // (1 + negatives))
    ne_labels = data.eval_impressions[0].labels[:, 0]
    assert ne_labels.sum() * 5 == len(ne_labels)  # one positive + 4 negatives per user, whatever training used


@pytest.mark.parametrize("flag", [["--negatives", "-1"], ["--lr", "0"], ["--lr", "2"]])
def test_cli_rejects_out_of_range_training_knobs(flag: list[str]):
    with pytest.raises(SystemExit):
        main(["--dataset", "gowalla", "--quick", *flag])


def test_budget_tool_counts_the_positives_it_trained_on(gowalla_root: Path, tmp_path: Path):
    from bench.budget import main as budget

    out = tmp_path / "budget.jsonl"
    argv = ["--data-root", str(gowalla_root), "--steps", "6", "--batch-size", "4", "--negatives", "1"]
    result = budget([*argv, "--out", str(out)])
    # 6 train positives, 2 per batch of 4 rows: 6 steps are two epochs
    assert result["positives_trained"] == 12 and result["epochs"] == 2.0
    assert 0.0 <= result["recall@20"] <= 1.0 and result["eval_users"] == 3
    assert json.loads(out.read_text().splitlines()[-1]) == result
    with pytest.raises(SystemExit):
        budget([*argv[:-2], "--negatives", "4"])  # a batch of 4 rows cannot hold 1 positive + 4 negatives
