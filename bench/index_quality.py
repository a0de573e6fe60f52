"""Index quality apart from the scorers: balance at every level, and the oracle cost of the leaves.

The recall of a beam search mixes two things: how well the index groups the items a user wants,
and how well the level models find those groups. The oracle cost isolates the first: the fewest
items an ideal leaf-picker (one that knows the user's true scores) must score to cover half of the
user's true top-100. An index that scatters a user's best items over many large leaves costs more,
whatever the scorers do.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hsnn.index import HierarchicalIndex
from hsnn.metrics import index_health


def level_health(index: HierarchicalIndex) -> list[dict[str, float]]:
    """`index_health` of every level, top first. A level-l node is a path prefix (k_1..k_l), so the
    level can hold up to the product of the codebook sizes down to l nodes; unused prefixes count as dead."""
    health = []
    for level in range(index.item_nodes.shape[1]):
        possible = math.prod(index.codebook_sizes[: level + 1])
        health.append(index_health(index.item_nodes[:, level], possible))
    return health


def min_cover_cost(hits: np.ndarray, sizes: np.ndarray, need: int) -> float:
    """Fewest items in a set of leaves holding at least `need` of the wanted items (exact, 0/1 knapsack).

    hits[j]: wanted items in leaf j; sizes[j]: its items. Dynamic programme over how many wanted items
    are covered (capped at `need`), so it is exact for any leaf sizes. inf when the leaves cannot cover.
    """
    cheapest = np.full(need + 1, np.inf)  # cheapest[c]: fewest items to cover c wanted items
    cheapest[0] = 0.0
    covered = np.arange(need + 1)
    for hit, size in zip(hits.tolist(), sizes.tolist(), strict=True):
        reach = np.minimum(covered + hit, need)
        with_leaf = np.full(need + 1, np.inf)
        np.minimum.at(with_leaf, reach, cheapest + size)
        cheapest = np.minimum(cheapest, with_leaf)
    return float(cheapest[need])


def oracle_cost(
    index: HierarchicalIndex, true_top_rows: Tensor, share: float = 0.5, top: int = 100
) -> dict[str, float]:
    """Items an ideal leaf-picker scores to cover `share` of each user's true top-`top` (over users).

    true_top_rows: (U, >= top) catalogue rows (= index rows) by true score, best first. Leaves are the
    index's last-level nodes. Returns the mean and median cost, and the mean as a share of the corpus.
    """
    leaf_of_item = index.item_nodes[:, -1]  # (N,)
    leaf_sizes = torch.bincount(leaf_of_item).numpy()
    need = math.ceil(share * top)
    costs = []
    for rows in true_top_rows[:, :top]:
        leaves, hits = torch.unique(leaf_of_item[rows], return_counts=True)
        costs.append(min_cover_cost(hits.numpy(), leaf_sizes[leaves.numpy()], need))
    values = np.asarray(costs)
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "mean_share": float(values.mean()) / index.num_items,
        "users": float(len(values)),
    }
