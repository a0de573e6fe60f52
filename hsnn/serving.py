"""Layer-wise retrieval over a HierarchicalIndex (`bench.exhaustive` holds the exhaustive scoring it must match).

Per query: each level's user tower once; level 0 scores every node, each later level the children of the
nodes the previous one kept (top-b), the item level the live items under the kept leaves; the ensemble
combines each candidate's outputs along its path. Pairs carry a user row, so a batch of users (the API's
request batching) goes through in one pass.

Scoring splits the first over-arch Linear, W [u; i; x] = W_u u + (W_i i + b) + W_x x: the item halves are
index tables, W_u u runs once per user, so per pair only W_x x and the rest of the net run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hsnn.features import UserBatch
from hsnn.index import HierarchicalIndex, expand_ranges
from hsnn.lti import rank_in_groups
from hsnn.model import CLICK, HSNN
from hsnn.monn import MoNN


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


def ensure_score_tables(model: HSNN, index: HierarchicalIndex) -> None:
    """Fill the item-half tables an index lacks (e.g. one read back from the index store); idempotent."""
    if index.item_first is None:
        index.item_first = model.item_model.item_first(index.item_embeddings)
    for level, level_model in zip(index.levels, model.level_models, strict=True):
        if level.first is None:
            level.first = level_model.item_first(level.projected)


def score_nodes(
    model: MoNN,
    level_idx: int,
    index: HierarchicalIndex,
    user_emb: Tensor,
    pair_user: Tensor,
    pair_node: Tensor,
    precomputed: bool = True,
) -> Tensor:
    """Level MoNN on <user, node> pairs: (P, tasks). Inputs are the user and the node embedding only,
    exactly what training feeds the level models (HSNN.forward). user_emb: (U, n_u, d)."""
    level = index.levels[level_idx]
    if not precomputed:  # the plain reference, kept for the loadgen's before/after measurement
        return model.pair_logits(user_emb[pair_user], level.projected[pair_node], None)
    table = level.first if level.first is not None else model.item_first(level.projected)
    return model.pair_logits_split(
        user_emb, model.user_first(user_emb), pair_user, level.projected, table, pair_node, None
    )


def score_items(
    model: MoNN,
    index: HierarchicalIndex,
    users: UserBatch,
    user_emb: Tensor,
    pair_user: Tensor,
    rows: Tensor,
    precomputed: bool = True,
) -> Tensor:
    """Item MoNN on <user, item row> pairs: (P, tasks), with the pair's I2IF interaction features."""
    interaction = model.encode_interactions(users, index.items, pair_user, rows)
    if not precomputed:
        return model.pair_logits(user_emb[pair_user], index.item_embeddings[rows], interaction)
    table = index.item_first if index.item_first is not None else model.item_first(index.item_embeddings)
    return model.pair_logits_split(
        user_emb, model.user_first(user_emb), pair_user, index.item_embeddings, table, rows, interaction
    )


def _top_per_user(pair_user: Tensor, score: Tensor, limit: int) -> Tensor:
    """Positions of each user's `limit` best pairs, grouped by user and best first (a segmented top-k)."""
    order, rank = rank_in_groups(pair_user, score, descending=True)
    return order[rank < limit]


@torch.no_grad()
def retrieve(
    model: HSNN,
    index: HierarchicalIndex,
    users: UserBatch,
    k: int,
    beams: Sequence[int],
    exclude: Sequence[Tensor | None] | None = None,
    precomputed: bool = True,
) -> list[Retrieved]:
    """Top-k live items per user by layer-wise beam search, beams[l] nodes kept at level l. The batch's users
    move through each level together as flat (user, node) pairs; the per-user top-b is a segmented sort.
    `precomputed=False` scores with the plain `MoNN.pair_logits` (same results; the loadgen's before/after)."""
    if len(beams) != model.num_levels:
        raise ValueError(f"need one beam width per index level ({model.num_levels}), got {list(beams)}")
    model.eval()
    ensure_score_tables(model, index)
    num_users = len(users)
    device = index.item_embeddings.device  # every per-query tensor lives beside the index (cpu or cuda)
    nodes_scored = torch.zeros(num_users, dtype=torch.long, device=device)
    flops = torch.zeros(num_users, dtype=torch.long, device=device)
    num_top = len(index.levels[0].keys)
    pair_user = torch.arange(num_users, device=device).repeat_interleave(num_top)
    candidates = torch.arange(num_top, device=device).repeat(num_users)
    ancestors = torch.empty(len(candidates), 0, model.ensemble.bias.shape[1], device=device)
    for level_idx, level_model in enumerate(model.level_models):
        user_emb = level_model.encode_users(users)
        z = score_nodes(level_model, level_idx, index, user_emb, pair_user, candidates, precomputed)
        path = torch.cat([ancestors, z.unsqueeze(1)], dim=1)
        score = model.calibrate(level_idx, model.ensemble(level_idx, path))[:, CLICK]
        scored = torch.bincount(pair_user, minlength=num_users)
        nodes_scored += scored
        flops += scored * level_model.pair_flops(precomputed)
        kept = _top_per_user(pair_user, score, beams[level_idx])
        children, counts = expand_ranges(index.levels[level_idx].child_offsets, candidates[kept])
        pair_user = torch.repeat_interleave(pair_user[kept], counts)
        ancestors = torch.repeat_interleave(path[kept], counts, dim=0)
        candidates = children
    # candidates are now positions in index.leaf_items: drop expired and excluded items
    rows = index.leaf_items[candidates]
    keep = index.live[rows]
    for u, banned in enumerate(exclude or []):
        if banned is not None and len(banned):
            mine = pair_user == u
            keep[mine] &= ~torch.isin(index.item_ids[rows[mine]], banned)
    rows, pair_user, ancestors = rows[keep], pair_user[keep], ancestors[keep]
    item_model = model.item_model
    z = score_items(item_model, index, users, item_model.encode_users(users), pair_user, rows, precomputed)
    path = torch.cat([ancestors, z.unsqueeze(1)], dim=1)
    item_level = model.num_outputs - 1
    scores = torch.sigmoid(model.calibrate(item_level, model.ensemble(item_level, path))[:, CLICK])
    items_scored = torch.bincount(pair_user, minlength=num_users)
    flops += items_scored * item_model.pair_flops(precomputed)
    best = _top_per_user(pair_user, scores, k)
    per_user = best.split(torch.bincount(pair_user[best], minlength=num_users).tolist())
    nodes_scored, items_scored, flops = nodes_scored.tolist(), items_scored.tolist(), flops.tolist()
    return [
        Retrieved(
            item_ids=index.item_ids[rows[positions]],
            scores=scores[positions],
            rows=rows[positions],
            cost=QueryCost(nodes_scored[u], items_scored[u], flops[u]),
        )
        for u, positions in enumerate(per_user)
    ]
