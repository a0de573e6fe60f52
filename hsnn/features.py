"""Feature tensors and I2IF, one implementation for training and serving.

Users and items are kept apart (a user's tower runs once per request, an item's once per index build); a
batch of <user, item> pairs is two index vectors into them: `pair_user = pair_item = arange(B)` in
training, one user row and many item rows at serving.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hsnn.config import FeatureSchema


@dataclass
class UserBatch:
    """U users. Sparse lists and history are right-padded with 0."""

    dense: Tensor  # (U, user_dense_dim) float
    sparse: dict[str, Tensor]  # name -> (U, L) long
    history: dict[str, Tensor]  # item attribute -> (U, H) long: attribute of each engaged item
    history_age: Tensor  # (U, H) float, age of each engagement (hours); ignored where padded

    def __len__(self) -> int:
        return self.dense.shape[0]

    def select(self, rows: Tensor) -> UserBatch:
        return self.apply(lambda t: t[rows])

    def to(self, device: torch.device | str) -> UserBatch:
        return self.apply(lambda t: t.to(device))

    def apply(self, fn: Callable[[Tensor], Tensor]) -> UserBatch:
        """This batch with `fn` applied to every tensor."""
        sparse, history = ({k: fn(v) for k, v in part.items()} for part in (self.sparse, self.history))
        return UserBatch(fn(self.dense), sparse, history, fn(self.history_age))


@dataclass
class ItemBatch:
    """N items. Every sparse item feature holds exactly one id per item."""

    dense: Tensor  # (N, item_dense_dim) float
    sparse: dict[str, Tensor]  # name -> (N,) long

    def __len__(self) -> int:
        return self.dense.shape[0]

    def select(self, rows: Tensor) -> ItemBatch:
        return ItemBatch(dense=self.dense[rows], sparse={k: v[rows] for k, v in self.sparse.items()})

    def to(self, device: torch.device | str) -> ItemBatch:
        return ItemBatch(dense=self.dense.to(device), sparse={k: v.to(device) for k, v in self.sparse.items()})

    @staticmethod
    def concat(parts: Sequence[ItemBatch]) -> ItemBatch:
        return ItemBatch(
            dense=torch.cat([p.dense for p in parts]),
            sparse={k: torch.cat([p.sparse[k] for p in parts]) for k in parts[0].sparse},
        )


@dataclass
class InteractionFeatures:
    """I2IF output for P pairs: dense (count, recency, share per attribute) and matched ids."""

    dense: Tensor  # (P, 3 * num_attributes)
    sparse: dict[str, Tensor]  # attribute -> (P, 1): the item's value when the user engaged with it, else 0


@dataclass
class TrainingBatch:
    """One minibatch of impressions: row i is the pair (users[i], items[i])."""

    users: UserBatch
    items: ItemBatch
    labels: Tensor  # (B, num_tasks) float in {0, 1}
    soft_labels: Tensor | None = None  # (B, num_tasks) teacher probabilities, for distillation
    item_keys: Tensor | None = field(default=None)  # (B,) raw item ids, for bookkeeping only
    item_paths: Tensor | None = None  # (B, levels) fixed index paths: train on a given index instead of LTI's

    def __len__(self) -> int:
        return self.labels.shape[0]


def hash_ids(ids: Tensor, buckets: int, salt: int) -> Tensor:
    """Map raw positive ids of any size into [1, buckets), keeping 0 (padding) at 0. Ids below m = buckets - 1
    go through a salted permutation of [0, m) (a catalogue 1..n < m gets no collisions), larger ones through
    multiplicative hashing; the salt differs per feature, so features sharing raw ids collide differently."""
    m = buckets - 1
    prime = 2_147_483_629
    mixed = ((ids % prime) * 0x9E3779B1 + salt * 0x85EBCA6B) % prime
    permuted = (ids.clamp(min=0, max=max(m - 1, 0)) * _coprime_multiplier(m) + salt * 0x85EBCA6B) % m
    hashed = torch.where(ids < m, permuted, mixed % m) + 1
    return torch.where(ids > 0, hashed, torch.zeros_like(hashed))


@functools.cache
def _coprime_multiplier(m: int) -> int:
    """A multiplier near m's golden-ratio point that is coprime with m (so `i * a mod m` permutes [0, m))."""
    a = max(1, int(m * 0.6180339887))
    while math.gcd(a, m) != 1:
        a += 1
    return a


def interaction_features(
    schema: FeatureSchema, users: UserBatch, items: ItemBatch, pair_user: Tensor, pair_item: Tensor
) -> InteractionFeatures:
    """I2IF: look each item's attributes up in the user's engagement history. Per attribute and pair: log1p of
    how many history events share the item's value, the recency weight exp(-age / scale) of the newest one,
    the share of the history that matched, and the matched id (0 when none) as a sparse feature."""
    valid = users.history[schema.history_attributes[0]][pair_user] > 0  # (P, H)
    age = users.history_age[pair_user]
    recency = torch.exp(-age.clamp(min=0) / schema.recency_scale)
    history_size = valid.sum(dim=1).clamp(min=1).to(recency.dtype)
    dense_parts, sparse = [], {}
    for attribute in schema.interaction_attributes:
        item_value = items.sparse[attribute][pair_item]  # (P,)
        history_values = users.history[attribute][pair_user]  # (P, H)
        match = (history_values == item_value.unsqueeze(1)) & valid & (item_value.unsqueeze(1) > 0)
        count = match.sum(dim=1).to(recency.dtype)
        newest = torch.where(match, recency, torch.zeros_like(recency)).amax(dim=1)
        dense_parts += [torch.log1p(count), newest, count / history_size]
        sparse[attribute] = torch.where(count > 0, item_value, torch.zeros_like(item_value)).unsqueeze(1)
    return InteractionFeatures(dense=torch.stack(dense_parts, dim=1), sparse=sparse)


def interaction_dense_dim(schema: FeatureSchema) -> int:
    return 3 * len(schema.interaction_attributes)
