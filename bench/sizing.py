"""Index and beam sizes for a corpus: how the benchmarks and the load generator shape the learned index."""

from __future__ import annotations

import math
from collections.abc import Sequence


def index_shape(num_items: int, levels: int = 2, items_per_leaf: int = 100, min_nodes: int = 2) -> list[int]:
    """Codebook sizes per level for a corpus: about `items_per_leaf` items per leaf, levels equally wide.

    10^5 items -> [32, 32]; 10^6 -> [100, 100]; the top level stays O(100-1,000) as in the paper's I1.
    """
    if num_items < 1 or levels < 1:
        raise ValueError("need at least one item and one level")
    leaves = max(min_nodes**levels, math.ceil(num_items / items_per_leaf))
    width = max(min_nodes, round(leaves ** (1 / levels)))
    return [width] * levels


# Parents kept per level for serving: 16 x what the next beam needs. The top levels are cheap (a few hundred
# node pairs) and the level models rank nodes worse than the index could (`bench.serving_recall`, tiny model,
# 3,000 items: recall vs exhaustive 0.61 -> 0.70 at 10^5 ads and 0.34 -> 0.42 at 10^6 going from 4 to 16;
# 64 adds nothing).
SERVING_WIDENING = 16.0


def beams_for_budget(sizes: Sequence[int], num_items: int, items_budget: int, widening: float = 4.0) -> list[int]:
    """Beam per level so that about `items_budget` items are scored at the item level.

    Leaves hold num_items / prod(sizes) items on average, so the last beam keeps budget / that many
    leaves; each level above keeps `widening` x the parents those leaves need, so a good leaf under a
    second-best parent is still reachable.
    """
    per_leaf = num_items / math.prod(sizes)
    beams = [max(1, math.ceil(items_budget / max(per_leaf, 1e-9)))]
    for size in reversed(sizes[1:]):
        beams.insert(0, max(1, math.ceil(widening * beams[0] / size)))
    return [min(b, math.prod(sizes[: i + 1])) for i, b in enumerate(beams)]
