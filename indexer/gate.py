"""The indexer's gate: every level's balance, recorded with each index, and the cap past which it refuses to flip."""

from __future__ import annotations

import math

import torch

from hsnn.index import HierarchicalIndex
from hsnn.metrics import index_health


def level_health(index: HierarchicalIndex) -> list[dict[str, float]]:
    """Balance of every level over all its possible nodes (prefixes): used/nodes, max/mean, entropy, gini,
    and the largest node's size beside the live item count (a cap of c x mean allows ceil(c * items / nodes)).

    Only live items count. The indexer records this with every index and refuses one past its limit.
    """
    live = index.live
    out = []
    for level_idx in range(len(index.levels)):
        possible = 1
        for size in index.codebook_sizes[: level_idx + 1]:
            possible *= size
        keys = torch.zeros(int(live.sum()), dtype=torch.long)
        for upper in range(level_idx + 1):
            keys = keys * index.codebook_sizes[upper] + index.paths[live, upper]
        stats = index_health(keys, possible)
        stats["items"] = float(len(keys))
        stats["max_size"] = float(torch.bincount(keys).max()) if len(keys) else 0.0
        out.append(stats)
    return out


def within_capacity(health: list[dict[str, float]], capacity_factor: float) -> bool:
    """True when no level's largest node exceeds ceil(capacity_factor x its level's mean size)."""
    return all(
        level["max_size"] <= math.ceil(capacity_factor * level["items"] / level["nodes"] - 1e-9) for level in health
    )
