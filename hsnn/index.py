"""The in-memory hierarchical index that serving walks: nodes per level, children, items per leaf.

Level-l nodes are the distinct hard path prefixes (k_1..k_l) in key order, so a node's children (a leaf's
items) are one contiguous range, CSR offsets into the next level. What a query needs that does not depend on
the user (item tower outputs, node projections, each MoNN's first-Linear item half) is built once per version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from hsnn.features import ItemBatch
from hsnn.lti import group_means
from hsnn.model import HSNN

DEFAULT_CAPACITY_FACTOR = 2.0  # no node larger than twice its level's mean


@dataclass
class IndexLevel:
    keys: Tensor  # (M,) encoded path prefix, sorted
    embedding: Tensor  # (M, dim) hard node embedding (sum of codes along the prefix)
    projected: Tensor  # (M, num_embed, dim) the level MoNN's item-side input, precomputed
    representative: Tensor  # (M,) item row closest to the node embedding among the node's items
    child_offsets: Tensor  # (M + 1,) CSR into the next level's nodes, or into `leaf_items` at the last level
    sizes: Tensor  # (M,) items under the node
    first: Tensor | None = None  # (M, hidden) W_i node + b, the level MoNN's first Linear (None: dot product/unbuilt)


@dataclass
class HierarchicalIndex:
    item_ids: Tensor  # (N,) raw ad ids
    items: ItemBatch  # features of the N items
    item_embeddings: Tensor  # (N, num_embed, dim) item-level MoNN item tower output
    paths: Tensor  # (N, levels) hard codes
    item_nodes: Tensor  # (N, levels) node row of each item at each level
    levels: list[IndexLevel]
    leaf_items: Tensor  # (N,) item rows grouped by leaf, in leaf order
    live: Tensor  # (N,) False once an item expired
    codebook_sizes: list[int]
    item_first: Tensor | None = None  # (N, hidden) W_i item + b, item MoNN's first Linear (None: dot product/unbuilt)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def device(self) -> torch.device:
        return self.item_embeddings.device

    def to(self, device: torch.device | str) -> HierarchicalIndex:
        """This index with every tensor on `device`: built on the CPU (the capacity auction is sequential),
        served where the model is."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        levels = [
            IndexLevel(**{name: move(getattr(level, name)) for name in IndexLevel.__dataclass_fields__})
            for level in self.levels
        ]
        tensors = {
            name: move(getattr(self, name))
            for name in ("item_ids", "item_embeddings", "paths", "item_nodes", "leaf_items", "live", "item_first")
        }
        return HierarchicalIndex(
            **tensors, items=self.items.to(device), levels=levels, codebook_sizes=list(self.codebook_sizes)
        )

    def expire(self, item_ids: Tensor) -> int:
        """Mark items as expired (serving skips them); returns how many were live."""
        hit = torch.isin(self.item_ids, item_ids) & self.live
        self.live &= ~hit
        return int(hit.sum())

    def with_items(
        self,
        model: HSNN,
        item_ids: Tensor,
        items: ItemBatch,
        item_embeddings: Tensor | None = None,
        paths: Tensor | None = None,
        replace: bool = True,
    ) -> HierarchicalIndex:
        """A new index with these items appended (this one stays): each joins its hard path's leaf, a new prefix
        becomes a new node, the layout is recomputed. Embeddings and paths come from `model` unless given (an
        indexer's delta). `replace` expires rows holding these ids first, so an update is append + expire;
        expired rows stay until the next full build."""
        if item_embeddings is None:
            item_embeddings = encode_catalog(model, items)
        if paths is None:
            paths = model.index.assign(model.index_vectors(item_embeddings, items))
        live = self.live.clone()
        if replace and len(item_ids):
            live &= ~torch.isin(self.item_ids, item_ids)
        return _layout(
            model,
            torch.cat([self.item_ids, item_ids]),
            ItemBatch.concat([self.items, items]),
            torch.cat([self.item_embeddings, item_embeddings.to(self.item_embeddings.dtype)]),
            torch.cat([self.paths, paths.to(self.paths.dtype)]),
            torch.cat([live, torch.ones(len(item_ids), dtype=torch.bool)]),
        )


def expand_ranges(offsets: Tensor, parents: Tensor) -> tuple[Tensor, Tensor]:
    """All rows in offsets[p]:offsets[p+1] for each p in parents, and how many each p gave."""
    starts, counts = offsets[parents], offsets[parents + 1] - offsets[parents]
    total = int(counts.sum())
    first_of_range = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.repeat_interleave(starts, counts) + torch.arange(total, device=offsets.device) - first_of_range, counts


def _closest_per_group(group: Tensor, distance: Tensor, num_groups: int) -> Tensor:
    """For each group, the row with the smallest distance (lowest row on ties)."""
    best = torch.full((num_groups,), float("inf")).scatter_reduce(0, group, distance, "amin")
    rows = torch.arange(len(group))
    is_best = distance == best[group]
    return torch.full((num_groups,), len(group)).scatter_reduce(0, group[is_best], rows[is_best], "amin")


@torch.no_grad()
def encode_catalog(model: HSNN, items: ItemBatch, batch_size: int = 8192, progress: bool = False) -> Tensor:
    """Item tower over the whole catalogue in batches: (N, num_embed, dim)."""
    model.eval()
    chunks = []
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, "item tower", unit="batch", leave=False, dynamic_ncols=True, disable=not progress):
        rows = torch.arange(start, min(start + batch_size, len(items)))
        chunks.append(model.item_model.encode_items(items.select(rows)))
    return torch.cat(chunks)


@torch.no_grad()
def build_index(
    model: HSNN,
    item_ids: Tensor,
    items: ItemBatch,
    paths: Tensor | None = None,
    batch_size: int = 8192,
    progress: bool = False,
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
) -> HierarchicalIndex:
    """Assign every item to its hard path and lay the hierarchy out for serving.

    With `capacity_factor` c no node holds over c x its level's mean, whatever training left: the auction's
    prices (`ResidualIndex.assign_with_capacity`) stay in `model`, so the indexer's later single-item
    assignments follow the same rule; None keeps the plain argmin. `paths` overrides the learned assignment
    (the benchmark's other index builders: an existing hierarchy, k-means, EM) with the same serving code.
    """
    if len(item_ids) == 0:
        raise ValueError("cannot build an index over an empty catalogue")
    item_embeddings = encode_catalog(model, items, batch_size, progress)
    vectors = model.index_vectors(item_embeddings, items)
    if paths is None and capacity_factor is not None:
        paths = model.index.assign_with_capacity(vectors, capacity_factor)
    elif paths is None:
        paths = torch.cat([model.index.assign(chunk) for chunk in vectors.split(batch_size)])
    live = torch.ones(len(item_ids), dtype=torch.bool)
    return _layout(model, item_ids.clone(), items, item_embeddings, paths, live, vectors)


@torch.no_grad()
def _layout(
    model: HSNN,
    item_ids: Tensor,
    items: ItemBatch,
    item_embeddings: Tensor,
    paths: Tensor,
    live: Tensor,
    vectors: Tensor | None = None,
) -> HierarchicalIndex:
    """Lay the hierarchy out over items whose embeddings and hard paths are known. A node's representative is
    its closest *live* member when it has one (its closest member otherwise)."""
    if vectors is None:  # (N, index_dim): what the index assigns, for each node's closest member
        vectors = model.index_vectors(item_embeddings, items)
    penalty = None if bool(live.all()) else torch.where(live, 0.0, float("inf"))
    codebook_sizes = [level.num_nodes for level in model.index.levels]
    item_nodes = torch.empty_like(paths)
    levels: list[IndexLevel] = []
    keys = torch.zeros(len(item_ids), dtype=torch.long)
    cumulative = torch.zeros_like(vectors)
    for level_idx, size in enumerate(codebook_sizes):
        keys = keys * size + paths[:, level_idx]
        node_keys, inverse = torch.unique(keys, return_inverse=True)
        item_nodes[:, level_idx] = inverse
        cumulative = cumulative + model.index.levels[level_idx].codebook[paths[:, level_idx]]
        distance = ((vectors - cumulative) ** 2).sum(dim=1)
        ranked = distance if penalty is None else distance + penalty
        representative = _closest_per_group(inverse, ranked, len(node_keys))
        embedding = cumulative[representative]
        member_means = group_means(item_embeddings.flatten(1), inverse, len(node_keys))[0]  # (M, item_size)
        node_input = model.node_inputs(level_idx, node_keys, embedding, member_means)
        projected = model.level_models[level_idx].project_nodes(node_input)  # (M, num_embed, dim)
        levels.append(
            IndexLevel(
                keys=node_keys,
                embedding=embedding,
                projected=projected,
                first=model.level_models[level_idx].item_first(projected),
                representative=representative,
                child_offsets=torch.empty(0, dtype=torch.long),
                sizes=torch.bincount(inverse, minlength=len(node_keys)),
            )
        )
    for level_idx in range(len(levels) - 1):
        upper, lower = levels[level_idx], levels[level_idx + 1]
        parent_keys = lower.keys // codebook_sizes[level_idx + 1]  # sorted, since lower.keys is
        first_child = torch.searchsorted(parent_keys, upper.keys)
        upper.child_offsets = torch.cat([first_child, torch.tensor([len(lower.keys)])])
    leaf_items = torch.argsort(item_nodes[:, -1], stable=True)
    levels[-1].child_offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(levels[-1].sizes, 0)])
    return HierarchicalIndex(
        item_ids=item_ids,
        items=items,
        item_embeddings=item_embeddings,
        paths=paths,
        item_nodes=item_nodes,
        levels=levels,
        leaf_items=leaf_items,
        live=live,
        codebook_sizes=codebook_sizes,
        item_first=model.item_model.item_first(item_embeddings),
    )
