"""Layer-wise retrieval over a HierarchicalIndex, and the exhaustive scoring it must match.

Per query: each level's user tower once; level 0 scores every node; each later level scores
the children of the nodes the previous level kept (top-b); the item level scores the live
items under the kept leaves with the item MoNN; the ensemble combines each candidate's
outputs along its path. Several users are scored in one pass (pairs carry a user row), which
is what request batching in the API relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hsnn.features import UserBatch
from hsnn.index import HierarchicalIndex, expand_ranges
from hsnn.model import HSNN
from hsnn.monn import MoNN

CLICK = 0  # the task the retrieval ranks by


@dataclass
class QueryCost:
    nodes_scored: int = 0
    items_scored: int = 0
    flops: int = 0


@dataclass
class Retrieved:
    item_ids: Tensor  # (k,) raw ad ids, best first
    scores: Tensor  # (k,) calibrated click probability
    rows: Tensor  # (k,) rows in the index
    cost: QueryCost = field(default_factory=QueryCost)


def _score_nodes(
    model: MoNN,
    level_idx: int,
    index: HierarchicalIndex,
    users: UserBatch,
    user_emb: Tensor,
    pair_user: Tensor,
    pair_node: Tensor,
) -> Tensor:
    """Level MoNN on <user, node>: node embedding as the item side, the representative item's I2IF."""
    level = index.levels[level_idx]
    interaction = model.encode_interactions(users, index.items, pair_user, level.representative[pair_node])
    return model.pair_logits(user_emb[pair_user], level.projected[pair_node], interaction)


def _score_items(
    model: MoNN, index: HierarchicalIndex, users: UserBatch, user_emb: Tensor, pair_user: Tensor, rows: Tensor
) -> Tensor:
    interaction = model.encode_interactions(users, index.items, pair_user, rows)
    return model.pair_logits(user_emb[pair_user], index.item_embeddings[rows], interaction)


def _pairs(candidates: list[Tensor]) -> Tensor:
    return torch.cat([torch.full((len(c),), u, dtype=torch.long) for u, c in enumerate(candidates)])


def _allowed(index: HierarchicalIndex, rows: Tensor, exclude: Tensor | None) -> Tensor:
    """Mask over rows: live and not excluded by the request."""
    keep = index.live[rows]
    if exclude is not None and len(exclude):
        keep &= ~torch.isin(index.item_ids[rows], exclude)
    return keep


@torch.no_grad()
def retrieve(
    model: HSNN,
    index: HierarchicalIndex,
    users: UserBatch,
    k: int,
    beams: Sequence[int],
    exclude: Sequence[Tensor | None] | None = None,
) -> list[Retrieved]:
    """Top-k live items per user by layer-wise beam search; beams[l] nodes kept at level l."""
    if len(beams) != model.num_levels:
        raise ValueError(f"need one beam width per index level ({model.num_levels}), got {list(beams)}")
    model.eval()
    num_users = len(users)
    exclude = exclude or [None] * num_users
    costs = [QueryCost() for _ in range(num_users)]
    candidates = [torch.arange(len(index.levels[0].keys))] * num_users
    ancestors = [torch.empty(len(c), 0, model.ensemble.bias.shape[1]) for c in candidates]
    for level_idx, level_model in enumerate(model.level_models):
        pair_user = _pairs(candidates)
        z = _score_nodes(
            level_model, level_idx, index, users, level_model.encode_users(users), pair_user, torch.cat(candidates)
        )
        per_user = z.split([len(c) for c in candidates])
        level = index.levels[level_idx]
        for u in range(num_users):
            path = torch.cat([ancestors[u], per_user[u].unsqueeze(1)], dim=1)
            score = model.calibrate(level_idx, model.ensemble(level_idx, path))[:, CLICK]
            top = torch.topk(score, min(beams[level_idx], len(score))).indices
            costs[u].nodes_scored += len(score)
            costs[u].flops += len(score) * level_model.pair_flops()
            children, counts = expand_ranges(level.child_offsets, candidates[u][top])
            candidates[u] = children
            ancestors[u] = torch.repeat_interleave(path[top], counts, dim=0)
    # candidates are now item positions in index.leaf_items; drop expired and excluded ones
    item_rows, item_ancestors = [], []
    for u in range(num_users):
        rows = index.leaf_items[candidates[u]]
        keep = _allowed(index, rows, exclude[u])
        item_rows.append(rows[keep])
        item_ancestors.append(ancestors[u][keep])
    item_model = model.item_model
    pair_user = _pairs(item_rows)
    z = _score_items(item_model, index, users, item_model.encode_users(users), pair_user, torch.cat(item_rows))
    per_user = z.split([len(r) for r in item_rows])
    results = []
    for u in range(num_users):
        path = torch.cat([item_ancestors[u], per_user[u].unsqueeze(1)], dim=1)
        costs[u].items_scored = len(path)
        costs[u].flops += len(path) * item_model.pair_flops()
        results.append(_top_k(model, index, path, item_rows[u], k, costs[u]))
    return results


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
    """Score every live item along its own path (the quality ceiling and the equality reference)."""
    model.eval()
    num_users = len(users)
    exclude = exclude or [None] * num_users
    all_rows = torch.arange(index.num_items)
    node_outputs = []  # per level: (users, nodes, tasks)
    for level_idx, level_model in enumerate(model.level_models):
        num_nodes = len(index.levels[level_idx].keys)
        pair_user = torch.arange(num_users).repeat_interleave(num_nodes)
        pair_node = torch.arange(num_nodes).repeat(num_users)
        z = _score_nodes(level_model, level_idx, index, users, level_model.encode_users(users), pair_user, pair_node)
        node_outputs.append(z.view(num_users, num_nodes, -1))
    item_model = model.item_model
    user_emb = item_model.encode_users(users)
    results = []
    for u in range(num_users):
        rows = all_rows[_allowed(index, all_rows, exclude[u])]
        z_item = _score_items(item_model, index, users, user_emb, torch.full((len(rows),), u), rows)
        ancestors = [node_outputs[lvl][u, index.item_nodes[rows, lvl]] for lvl in range(model.num_levels)]
        path = torch.stack([*ancestors, z_item], dim=1)
        nodes = sum(len(level.keys) for level in index.levels)
        cost = QueryCost(
            nodes_scored=nodes,
            items_scored=len(rows),
            flops=len(rows) * item_model.pair_flops()
            + sum(len(lv.keys) * m.pair_flops() for lv, m in zip(index.levels, model.level_models, strict=True)),
        )
        results.append(_top_k(model, index, path, rows, k, cost))
    return results
