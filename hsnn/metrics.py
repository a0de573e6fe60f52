"""Metrics the services compute, with fixed definitions (DESIGN §4): NE (the trainer) and index health (the indexer)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS = 1e-7


def log_loss(probs: Tensor, labels: Tensor) -> float:
    p = probs.double().clamp(_EPS, 1 - _EPS)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def normalized_entropy(probs: Tensor, labels: Tensor, base_rate: float | None = None) -> float:
    """Mean log loss over that of always predicting the base rate (lower is better); `base_rate` defaults to
    this set's mean label, pass the training base rate for the DESIGN definition."""
    rate = float(labels.double().mean()) if base_rate is None else base_rate
    rate = min(max(rate, _EPS), 1 - _EPS)
    baseline = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return log_loss(probs, labels) / baseline


def index_health(node_of_item: Tensor, num_nodes: int) -> dict[str, float]:
    """Balance of an item->node assignment over all `num_nodes` codes (a dead code counts as size 0):
    max_over_mean is 1 for a perfectly even index; entropy is normalised to [0, 1]."""
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
