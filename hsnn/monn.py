"""MoNN: user, item and interaction towers feeding a DHEN-style over-arch, one logit per task.

A tower turns hashed sparse ids (embedding bags) and dense values into F field vectors, then emits
`num_embed x dim` embeddings from an MLP over the fields and an attentional-FM summary of their pairwise
products. The over-arch stacks them and adds explicit dot-product interactions and an MLP to a residual
stream. The Two Tower preset replaces the over-arch with a dot product.
"""

from __future__ import annotations

import itertools
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsnn.config import FeatureSchema, MoNNConfig, TowerConfig
from hsnn.features import ItemBatch, TrainingBatch, UserBatch, hash_ids, interaction_dense_dim, interaction_features

FREQUENCY_BUCKETS = 1 << 16  # hashed item counts for the logQ correction of the in-batch softmax


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class HashedEmbeddingBags(nn.Module):
    """One mean-pooled embedding bag per sparse feature; raw ids are hashed into the table."""

    def __init__(self, buckets: dict[str, int], dim: int):
        super().__init__()
        self.names = sorted(buckets)
        self.buckets = dict(buckets)
        self.salts = {name: zlib.crc32(name.encode()) % 65_521 for name in self.names}
        self.bags = nn.ModuleDict(
            {name: nn.EmbeddingBag(self.buckets[name], dim, mode="mean", padding_idx=0) for name in self.names}
        )
        for bag in self.bags.values():
            nn.init.normal_(bag.weight, std=0.05)

    def forward(self, ids: dict[str, Tensor]) -> list[Tensor]:
        """ids[name]: (N, L) raw ids, 0 = padding. Returns one (N, dim) vector per feature."""
        return [self.bags[name](hash_ids(ids[name], self.buckets[name], self.salts[name])) for name in self.names]


class AttentionalFM(nn.Module):
    """Explicit pairwise interactions: attention-weighted sum of the field-pair products."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, attention_dim), nn.ReLU(), nn.Linear(attention_dim, 1))

    def forward(self, fields: Tensor) -> Tensor:  # fields: (N, F, dim) -> (N, dim)
        num_fields = fields.shape[1]
        left, right = torch.triu_indices(num_fields, num_fields, offset=1, device=fields.device)
        # index_select, not fields[:, left]: its backward is an index_add, cheaper than advanced indexing's
        products = fields.index_select(1, left) * fields.index_select(1, right)  # (N, pairs, dim)
        weights = torch.softmax(self.attention(products), dim=1)
        return (weights * products).sum(dim=1)


class Tower(nn.Module):
    """Sparse + dense inputs -> (N, num_embed, dim)."""

    def __init__(self, config: TowerConfig, dense_dim: int, sparse_buckets: dict[str, int]):
        super().__init__()
        self.config = config
        self.bags = HashedEmbeddingBags(sparse_buckets, config.sparse_dim)
        self.dense = nn.Linear(dense_dim, config.sparse_dim) if dense_dim > 0 else None
        num_fields = len(sparse_buckets) + (1 if dense_dim > 0 else 0)
        use_afm = config.use_afm and num_fields >= 2
        self.afm = AttentionalFM(config.sparse_dim, config.afm_attention_dim) if use_afm else None
        width = num_fields * config.sparse_dim + (config.sparse_dim if use_afm else 0)
        self.mlp = mlp([width, *config.hidden, config.num_embed * config.dim])

    def forward(self, dense: Tensor, sparse: dict[str, Tensor]) -> Tensor:
        fields = self.bags(sparse)
        if self.dense is not None:
            fields.append(self.dense(dense))
        stacked = torch.stack(fields, dim=1)  # (N, F, sparse_dim)
        parts = [stacked.flatten(1)]
        if self.afm is not None:
            parts.append(self.afm(stacked))
        out = self.mlp(torch.cat(parts, dim=1))
        return out.view(-1, self.config.num_embed, self.config.dim)


class DHENLayer(nn.Module):
    """One over-arch layer: residual sum of a dot-product-interaction module and an MLP module."""

    def __init__(self, num_embed: int, dim: int, hidden: int):
        super().__init__()
        pairs = num_embed * (num_embed - 1) // 2
        self.dot_mix = nn.Linear(pairs, num_embed * dim) if pairs > 0 else None
        self.mlp = mlp([num_embed * dim, hidden, num_embed * dim])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, first: Tensor | None = None) -> Tensor:  # (P, n, dim)
        """`first`: this layer's first MLP Linear already applied to x, (P, hidden), when the caller
        assembled it from per-user and per-item halves (serving); None computes it here."""
        hidden = self.mlp[0](x.flatten(1)) if first is None else first
        update = self.mlp[1:](hidden)
        if self.dot_mix is not None:
            n = x.shape[1]
            left, right = torch.triu_indices(n, n, offset=1, device=x.device)
            upper = left * n + right  # the strictly upper triangle of the (n, n) Gram matrix, flattened
            dots = torch.bmm(x, x.transpose(1, 2)).flatten(1).index_select(1, upper)  # (P, n(n-1)/2)
            update = update + self.dot_mix(dots)
        return self.norm(x + update.view_as(x))


class OverArch(nn.Module):
    """Stacked DHEN layers over all tower embeddings, then a per-task head."""

    def __init__(self, num_embed: int, dim: int, layers: int, hidden: int, num_tasks: int):
        super().__init__()
        self.layers = nn.ModuleList(DHENLayer(num_embed, dim, hidden) for _ in range(layers))
        self.head = mlp([num_embed * dim, hidden, num_tasks])

    def forward(self, x: Tensor, first: Tensor | None = None) -> Tensor:
        """x: (P, n, dim); `first`: the first layer's first Linear on x, (P, hidden), if precomputed."""
        for i, layer in enumerate(self.layers):
            x = layer(x, first if i == 0 else None)
        return self.head(x.flatten(1))


class MoNN(nn.Module):
    """A Modular Neural Network scoring <user, item> pairs, one logit per task. With `item_input_dim` the item
    side projects a given vector instead of running an item tower: an HSNN level model scoring index nodes."""

    def __init__(self, config: MoNNConfig, schema: FeatureSchema, item_input_dim: int | None = None):
        super().__init__()
        self.config, self.schema = config, schema
        self.num_tasks = len(schema.tasks)
        user_buckets = dict(schema.user_sparse)
        user_buckets.update({f"history_{a}": schema.item_sparse[a] for a in schema.history_attributes})
        self.user_tower = Tower(config.user, schema.user_dense_dim, user_buckets)
        item_size = config.item.num_embed * config.item.dim
        if item_input_dim is None:
            self.item_tower: Tower | None = Tower(config.item, schema.item_dense_dim, schema.item_sparse)
            self.node_projection: nn.Linear | None = None
            # How often each (hashed) item appeared in training rows: the sampling probability q of the
            # in-batch softmax's negatives, whose log is subtracted so popular items are not over-penalised.
            self.register_buffer("item_row_counts", torch.zeros(FREQUENCY_BUCKETS))
        else:
            self.item_tower = None
            self.node_projection = nn.Linear(item_input_dim, item_size)
        self.interaction_tower: Tower | None = None
        if config.interaction is not None:
            buckets = {a: schema.item_sparse[a] for a in schema.interaction_attributes}
            self.interaction_tower = Tower(config.interaction, interaction_dense_dim(schema), buckets)
        if config.dot_product:
            self.task_scale = nn.Parameter(torch.zeros(self.num_tasks))
            self.task_bias = nn.Parameter(torch.zeros(self.num_tasks))
            self.overarch: OverArch | None = None
        else:
            num_embed = config.user.num_embed + config.item.num_embed
            dims = {config.user.dim, config.item.dim}
            if config.interaction is not None:
                num_embed += config.interaction.num_embed
                dims.add(config.interaction.dim)
            if len(dims) != 1:
                raise ValueError(f"{config.name}: the over-arch needs one embedding dim across towers, got {dims}")
            self.overarch = OverArch(
                num_embed, dims.pop(), config.overarch_layers, config.overarch_hidden, self.num_tasks
            )

    @property
    def item_embedding_size(self) -> int:
        return self.config.item.num_embed * self.config.item.dim

    def encode_users(self, users: UserBatch) -> Tensor:
        """(U, num_embed_user, dim_user): run once per user, shared by every item it is paired with."""
        sparse = dict(users.sparse)
        sparse.update({f"history_{a}": users.history[a] for a in self.schema.history_attributes})
        return self.user_tower(users.dense, sparse)

    def encode_items(self, items: ItemBatch) -> Tensor:
        """(N, num_embed_item, dim_item): run when an item changes, stored in the index."""
        if self.item_tower is None:
            raise RuntimeError("this MoNN scores index nodes; use project_nodes")
        return self.item_tower(items.dense, {k: v.unsqueeze(1) for k, v in items.sparse.items()})

    def project_nodes(self, node_embedding: Tensor) -> Tensor:
        """Node embeddings from the learned index -> this model's item-side embeddings."""
        assert self.node_projection is not None
        return self.node_projection(node_embedding).view(-1, self.config.item.num_embed, self.config.item.dim)

    def encode_interactions(
        self, users: UserBatch, items: ItemBatch, pair_user: Tensor, pair_item: Tensor
    ) -> Tensor | None:
        """(P, num_embed_ux, dim_ux) from I2IF features, or None for a Two Tower model."""
        if self.interaction_tower is None:
            return None
        i2if = interaction_features(self.schema, users, items, pair_user, pair_item)
        return self.interaction_tower(i2if.dense, i2if.sparse)

    def pair_logits(self, user_emb: Tensor, item_emb: Tensor, interaction_emb: Tensor | None) -> Tensor:
        """Logits (P, tasks) from already-gathered per-pair embeddings."""
        if self.overarch is None:
            dot = (user_emb.flatten(1) * item_emb.flatten(1)).sum(dim=1, keepdim=True)
            return F.softplus(self.task_scale) * dot + self.task_bias
        parts = [user_emb, item_emb] + ([interaction_emb] if interaction_emb is not None else [])
        return self.overarch(torch.cat(parts, dim=1))

    def _first_linear(self) -> nn.Linear | None:
        """The Linear that reads the flattened [user; item; interaction] stack, or None (dot product)."""
        if self.overarch is None or len(self.overarch.layers) == 0:
            return None
        return self.overarch.layers[0].mlp[0]

    def _column_ranges(self) -> tuple[slice, slice, slice]:
        """Columns of the first Linear fed by the user, item and interaction embeddings."""
        user = self.config.user.num_embed * self.config.user.dim
        item = user + self.item_embedding_size
        return slice(0, user), slice(user, item), slice(item, None)

    def _first_part(self, emb: Tensor, side: int, bias: bool = False) -> Tensor | None:
        """W_side emb (+ b): one side's columns of the first over-arch Linear (0 user, 1 item, 2 interaction)."""
        linear = self._first_linear()
        if linear is None:
            return None
        return F.linear(emb.flatten(1), linear.weight[:, self._column_ranges()[side]], linear.bias if bias else None)

    def user_first(self, user_emb: Tensor) -> Tensor | None:
        """(U, hidden) = W_u u, once per user, not per pair."""
        return self._first_part(user_emb, 0)

    def item_first(self, item_emb: Tensor) -> Tensor | None:
        """(N, hidden) = W_i i + b, precomputed once per index version."""
        return self._first_part(item_emb, 1, bias=True)

    def pair_logits_split(
        self,
        user_emb: Tensor,
        user_first: Tensor | None,
        pair_user: Tensor,
        item_emb: Tensor,
        item_first: Tensor | None,
        pair_item: Tensor,
        interaction_emb: Tensor | None,
    ) -> Tensor:
        """`pair_logits` (P, tasks) with the first Linear split, W [u; i; x] = W_u u + (W_i i + b) + W_x x: the
        halves are gathered rows, only W_x x runs per pair. user_emb: (U, n_u, d), user_first: (U, hidden);
        item_emb: (N, n_i, d), item_first: (N, hidden); interaction_emb: (P, n_x, d) or None."""
        users, items = user_emb[pair_user], item_emb[pair_item]  # (P, n_u, d), (P, n_i, d)
        if self.overarch is None or user_first is None or item_first is None:
            return self.pair_logits(users, items, interaction_emb)
        first = user_first[pair_user] + item_first[pair_item]  # (P, hidden)
        parts = [users, items]
        if interaction_emb is not None:
            first = first + self._first_part(interaction_emb, 2)
            parts.append(interaction_emb)
        return self.overarch(torch.cat(parts, dim=1), first=first)

    def forward(self, users: UserBatch, items: ItemBatch) -> Tensor:
        """Row i of users with row i of items -> (B, tasks) logits."""
        rows = torch.arange(len(items), device=items.dense.device)
        interaction = self.encode_interactions(users, items, rows, rows)
        return self.pair_logits(self.encode_users(users), self.encode_items(items), interaction)

    def pair_flops(self, item_side_precomputed: bool = False) -> int:
        """Multiply-adds x 2 per scored pair (interaction tower + over-arch), for cost reports; with
        `item_side_precomputed`, less the first Linear's user and item columns (serving gathers those)."""
        flops = 0
        linear = self._first_linear()
        if item_side_precomputed and linear is not None:
            user, item, _ = self._column_ranges()
            flops -= 2 * linear.out_features * (user.stop + item.stop - item.start)
        modules = [m for m in (self.interaction_tower, self.overarch) if m is not None]
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    flops += 2 * layer.in_features * layer.out_features
        if self.overarch is not None:
            for layer in self.overarch.layers:
                n, d = layer.mlp[0].in_features // layer.norm.normalized_shape[0], layer.norm.normalized_shape[0]
                flops += 2 * n * n * d
        else:
            flops += 2 * self.item_embedding_size
        return flops


def in_batch_softmax_loss(
    model: MoNN, batch: TrainingBatch, user_emb: Tensor, item_emb: Tensor, clicked: Tensor, max_candidates: int = 128
) -> Tensor:
    """Sampled softmax for every clicked row over the batch's distinct items, logQ-corrected: the retrieval
    objective (log loss on a few negatives ranks poorly on implicit feedback).

    Clicked row i, candidate j: s_ij = logit(u_i, j) - log q_j, loss = CE(s_i, own item); q_j is the share of
    training rows showing j (a hashed running count, updated here while training). user_emb: (B, n_user, d)
    and item_emb: (B, n_item, d) are the batch's tower outputs.
    """
    if len(clicked) == 0 or model.item_tower is None:
        return user_emb.new_zeros(())
    keys = batch.item_keys if batch.item_keys is not None else batch.items.sparse.get("item_id")
    if keys is None:
        raise ValueError("the in-batch softmax needs item keys or an item_id feature to tell items apart")
    bucket = hash_ids(keys, FREQUENCY_BUCKETS, salt=7) % FREQUENCY_BUCKETS  # (B,)
    if model.training:
        with torch.no_grad():
            model.item_row_counts.index_add_(0, bucket, torch.ones(len(bucket), dtype=model.item_row_counts.dtype))
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.arange(len(keys), device=keys.device)
    first_row = torch.full((len(unique_keys),), len(keys), device=keys.device).scatter_reduce(0, inverse, rows, "amin")
    target_unique = inverse[clicked]  # (P,) which distinct item each clicked row showed
    if len(unique_keys) > max_candidates:
        must = torch.unique(target_unique)
        rest = torch.ones(len(unique_keys), dtype=torch.bool, device=keys.device)
        rest[must] = False
        others = torch.nonzero(rest).flatten()
        others = others[torch.randperm(len(others), device=keys.device)[: max(0, max_candidates - len(must))]]
        chosen = torch.cat([must, others])
    else:
        chosen = torch.arange(len(unique_keys), device=keys.device)
    position = torch.full((len(unique_keys),), -1, dtype=torch.long, device=keys.device)
    position[chosen] = torch.arange(len(chosen), device=keys.device)
    candidate_rows = first_row[chosen]  # (M,)
    counts = model.item_row_counts[bucket[candidate_rows]].clamp(min=1.0)
    log_q = torch.log(counts / model.item_row_counts.sum().clamp(min=1.0))  # (M,)
    num_clicked, num_candidates = len(clicked), len(candidate_rows)
    pair_user = clicked.repeat_interleave(num_candidates)
    pair_item = candidate_rows.repeat(num_clicked)
    interaction = model.encode_interactions(batch.users, batch.items, pair_user, pair_item)
    logits = model.pair_logits(user_emb[pair_user], item_emb[pair_item], interaction)[:, 0]
    scores = logits.view(num_clicked, num_candidates) - log_q
    return F.cross_entropy(scores, position[target_unique])
