"""Exhaustive scoring: every live item along its own path, with serving's own scoring functions and tables.

The quality ceiling the benchmark and the load generator measure recall against, and the reference the
tests hold `hsnn.serving.retrieve` to: with beams that keep every node, the two return the same top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hsnn.features import UserBatch
from hsnn.index import HierarchicalIndex
from hsnn.model import CLICK, HSNN
from hsnn.serving import QueryCost, Retrieved, ensure_score_tables, score_items, score_nodes


def _allowed(index: HierarchicalIndex, rows: Tensor, exclude: Tensor | None) -> Tensor:
    """Mask over rows: live and not excluded by the request."""
    keep = index.live[rows]
    if exclude is not None and len(exclude):
        keep &= ~torch.isin(index.item_ids[rows], exclude)
    return keep


def _top_k(model: HSNN, index: HierarchicalIndex, path: Tensor, rows: Tensor, k: int, cost: QueryCost) -> Retrieved:
    item_level = model.num_outputs - 1
    scores = torch.sigmoid(model.calibrate(item_level, model.ensemble(item_level, path))[:, CLICK])
    top = torch.topk(scores, min(k, len(scores)))
    return Retrieved(item_ids=index.item_ids[rows[top.indices]], scores=top.values, rows=rows[top.indices], cost=cost)


@torch.no_grad()
def retrieve_exhaustive(
    model: HSNN,
    index: HierarchicalIndex,
    users: UserBatch,
    k: int,
    exclude: Sequence[Tensor | None] | None = None,
) -> list[Retrieved]:
    """Score every live item along its own path (the quality ceiling and the equality reference).

    Same scoring functions (and precomputed tables) as `retrieve`, so wide beams must equal this.
    """
    model.eval()
    ensure_score_tables(model, index)
    num_users = len(users)
    exclude = exclude or [None] * num_users
    device = index.device
    all_rows = torch.arange(index.num_items, device=device)
    node_outputs = []  # per level: (users, nodes, tasks)
    for level_idx, level_model in enumerate(model.level_models):
        num_nodes = len(index.levels[level_idx].keys)
        pair_user = torch.arange(num_users, device=device).repeat_interleave(num_nodes)
        pair_node = torch.arange(num_nodes, device=device).repeat(num_users)
        z = score_nodes(level_model, level_idx, index, level_model.encode_users(users), pair_user, pair_node)
        node_outputs.append(z.view(num_users, num_nodes, -1))
    item_model = model.item_model
    user_emb = item_model.encode_users(users)
    results = []
    for u in range(num_users):
        rows = all_rows[_allowed(index, all_rows, exclude[u])]
        z_item = score_items(item_model, index, users, user_emb, torch.full((len(rows),), u, device=device), rows)
        ancestors = [node_outputs[lvl][u, index.item_nodes[rows, lvl]] for lvl in range(model.num_levels)]
        path = torch.stack([*ancestors, z_item], dim=1)
        nodes = sum(len(level.keys) for level in index.levels)
        cost = QueryCost(
            nodes_scored=nodes,
            items_scored=len(rows),
            flops=len(rows) * item_model.pair_flops(True)
            + sum(len(lv.keys) * m.pair_flops(True) for lv, m in zip(index.levels, model.level_models, strict=True)),
        )
        results.append(_top_k(model, index, path, rows, k, cost))
    return results
