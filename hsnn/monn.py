"""MoNN: user, item and interaction towers feeding a DHEN-style over-arch, one logit per task.

The whole network is here. A tower turns sparse ids (embedding bags over hashed ids) and
dense values into F field vectors, then emits `num_embed x dim` embeddings from an MLP over
the fields plus an attentional-FM summary of their pairwise products. The over-arch stacks
those embeddings and mixes them with layers that add explicit dot-product interactions and
an MLP to a residual stream. The Two Tower preset replaces the over-arch with a dot product.
"""

from __future__ import annotations

import itertools
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsnn.config import FeatureSchema, MoNNConfig, TowerConfig
from hsnn.features import ItemBatch, UserBatch, hash_ids, interaction_dense_dim, interaction_features


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
        products = fields[:, left] * fields[:, right]  # (N, pairs, dim)
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

    def forward(self, x: Tensor) -> Tensor:  # (P, n, dim)
        update = self.mlp(x.flatten(1))
        if self.dot_mix is not None:
            n = x.shape[1]
            left, right = torch.triu_indices(n, n, offset=1, device=x.device)
            dots = torch.bmm(x, x.transpose(1, 2))[:, left, right]
            update = update + self.dot_mix(dots)
        return self.norm(x + update.view_as(x))


class OverArch(nn.Module):
    """Stacked DHEN layers over all tower embeddings, then a per-task head."""

    def __init__(self, num_embed: int, dim: int, layers: int, hidden: int, num_tasks: int):
        super().__init__()
        self.layers = nn.ModuleList(DHENLayer(num_embed, dim, hidden) for _ in range(layers))
        self.head = mlp([num_embed * dim, hidden, num_tasks])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x.flatten(1))


class MoNN(nn.Module):
    """A Modular Neural Network scoring <user, item> pairs, one logit per task.

    With `item_input_dim` set, the item side is a projection of a given vector instead of
    an item tower: that is how an HSNN level model scores index nodes from node embeddings.
    """

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

    def forward(self, users: UserBatch, items: ItemBatch) -> Tensor:
        """Row i of users with row i of items -> (B, tasks) logits."""
        rows = torch.arange(len(items), device=items.dense.device)
        interaction = self.encode_interactions(users, items, rows, rows)
        return self.pair_logits(self.encode_users(users), self.encode_items(items), interaction)

    def pair_flops(self) -> int:
        """Multiply-adds x 2 spent per scored pair (interaction tower + over-arch), for cost reports."""
        flops = 0
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
