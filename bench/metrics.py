"""Evaluation metrics with fixed definitions (DESIGN §4) that only offline evaluations report: calibration,
recall@K, NDCG@K and AUC. The services' own (NE, index health) are `hsnn.metrics`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def calibration(probs: Tensor, labels: Tensor) -> float:
    """Mean prediction / mean label (1.0 is perfectly calibrated)."""
    positives = float(labels.double().sum())
    return float(probs.double().sum()) / positives if positives > 0 else float("inf")


def recall_at_k(retrieved: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int) -> float:
    """Per user |top-k ∩ relevant| / |relevant|, averaged over users with at least one relevant item."""
    scores = [
        len(set(list(items)[:k]) & truth) / len(truth)
        for items, truth in zip(retrieved, relevant, strict=True)
        if truth
    ]
    return sum(scores) / len(scores) if scores else 0.0


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
