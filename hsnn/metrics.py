"""Offline metrics with fixed definitions (DESIGN §4): NE, calibration, recall@K, index health."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_EPS = 1e-7


def log_loss(probs: Tensor, labels: Tensor) -> float:
    p = probs.double().clamp(_EPS, 1 - _EPS)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def normalized_entropy(probs: Tensor, labels: Tensor, base_rate: float | None = None) -> float:
    """Mean log loss divided by the log loss of always predicting the base rate (lower is better).

    `base_rate` defaults to the mean label of this set; pass the training base rate to follow
    the DESIGN definition exactly.
    """
    rate = float(labels.double().mean()) if base_rate is None else base_rate
    rate = min(max(rate, _EPS), 1 - _EPS)
    baseline = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return log_loss(probs, labels) / baseline


def calibration(probs: Tensor, labels: Tensor) -> float:
    """Mean prediction / mean label (1.0 is perfectly calibrated)."""
    positives = float(labels.double().sum())
    return float(probs.double().sum()) / positives if positives > 0 else float("inf")


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties count half)."""
    scores, labels = scores.double().flatten(), labels.flatten() > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse = torch.unique(scores, return_inverse=True)
    mean_rank = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(unique)).double()
    rank_sum = float(mean_rank[inverse][labels].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def recall_at_k(retrieved: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int) -> float:
    """Per user |top-k ∩ relevant| / |relevant|, averaged over users with at least one relevant item."""
    scores = [
        len(set(list(items)[:k]) & truth) / len(truth)
        for items, truth in zip(retrieved, relevant, strict=True)
        if truth
    ]
    return sum(scores) / len(scores) if scores else 0.0


def ndcg_at_k(retrieved: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int) -> float:
    """Binary-relevance NDCG@K, averaged over users with at least one relevant item.

    DCG = sum over hits at ranks i = 1..K of 1 / log2(i + 1); the ideal DCG puts min(|relevant|, K)
    hits at the top ranks, so a user with fewer than K relevant items can still reach 1 (the
    definition RecBole and the LightGCN evaluation use).
    """
    scores = []
    for items, truth in zip(retrieved, relevant, strict=True):
        if not truth:
            continue
        dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(list(items)[:k]) if item in truth)
        ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(truth), k)))
        scores.append(dcg / ideal)
    return sum(scores) / len(scores) if scores else 0.0


def index_health(node_of_item: Tensor, num_nodes: int) -> dict[str, float]:
    """Balance of an item->node assignment over all `num_nodes` codes (a dead code counts as size 0).

    max_over_mean is 1 for a perfectly even index; entropy is normalised to [0, 1].
    """
    sizes = torch.bincount(node_of_item, minlength=num_nodes).double()
    used = sizes[sizes > 0]
    share = used / sizes.sum()
    entropy = float(-(share * share.log()).sum())
    ordered = torch.sort(sizes).values
    n = len(ordered)
    cumulative = torch.cumsum(ordered, 0)
    gini = float((n + 1 - 2 * (cumulative.sum() / cumulative[-1])) / n) if cumulative[-1] > 0 else 0.0
    return {
        "nodes": float(num_nodes),
        "used_nodes": float(len(used)),
        "dead_nodes": float(num_nodes - len(used)),
        "max_over_mean": float(sizes.max() / sizes.mean()),
        "entropy": entropy / math.log(num_nodes) if num_nodes > 1 else 1.0,
        "gini": gini,
    }
