"""A small planted retrieval problem: the core tests and the quick demo run on it.

Items sit in category clusters (dense features near their category's centre, advertisers
nested in categories). The hidden click logit has three parts a model has to find:
- a segment x category affinity table (clusters to index by),
- a bonus when the user engaged with the item's advertiser *recently*: the recency lives
  only in the history ages, which no tower sees, so only the I2IF interaction features carry
  it and a dot product of two towers cannot express it,
- a small per-item quality term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from hsnn.model import HSNN
from hsnn.training import train
from streaming.presets import TINY_SCHEMA, tiny_hsnn_config, tiny_monn

__all__ = [
    "SCHEMA",
    "PlantedWorld",
    "briefly_trained",
    "make_batches",
    "make_users",
    "make_world",
    "tiny_hsnn_config",
    "tiny_monn",
    "true_logits",
    "user_json",
]

SCHEMA = TINY_SCHEMA  # the planted world speaks the tiny preset's features


@dataclass
class PlantedWorld:
    items: ItemBatch
    item_ids: Tensor
    item_category: Tensor
    item_advertiser: Tensor
    item_quality: Tensor
    affinity: Tensor  # (segments, categories)
    num_segments: int


def make_world(
    num_items: int = 1200,
    num_categories: int = 12,
    advertisers_per_category: int = 8,
    num_segments: int = 6,
    seed: int = 0,
    category_weights: Tensor | None = None,
) -> PlantedWorld:
    g = torch.Generator().manual_seed(seed)
    weights = category_weights if category_weights is not None else torch.ones(num_categories)
    category = torch.multinomial(weights, num_items, replacement=True, generator=g)
    within = torch.randint(advertisers_per_category, (num_items,), generator=g)
    advertiser = category * advertisers_per_category + within
    centres = torch.randn(num_categories, 4, generator=g) * 2
    dense = centres[category] + 0.3 * torch.randn(num_items, 4, generator=g)
    item_ids = torch.arange(1, num_items + 1)
    items = ItemBatch(
        dense=dense,
        sparse={"item_id": item_ids, "advertiser": advertiser + 1, "category": category + 1},
    )
    affinity = torch.randn(num_segments, num_categories, generator=g) * 1.5
    quality = 0.3 * torch.randn(num_items, generator=g)
    return PlantedWorld(items, item_ids, category, advertiser, quality, affinity, num_segments)


def make_users(world: PlantedWorld, num_users: int, seed: int) -> tuple[UserBatch, Tensor]:
    """Users with a segment and a history drawn from the categories their segment likes."""
    g = torch.Generator().manual_seed(seed)
    segment = torch.randint(world.num_segments, (num_users,), generator=g)
    history_len = SCHEMA.history_length
    liked = torch.softmax(world.affinity[segment] * 2, dim=1)
    hist_items = torch.empty(num_users, history_len, dtype=torch.long)
    for u in range(num_users):
        cats = torch.multinomial(liked[u], history_len, replacement=True, generator=g)
        for h, c in enumerate(cats):
            members = torch.nonzero(world.item_category == c).flatten()
            if len(members) == 0:
                members = torch.arange(len(world.item_ids))
            hist_items[u, h] = members[torch.randint(len(members), (1,), generator=g)]
    lengths = torch.randint(1, history_len + 1, (num_users,), generator=g)
    mask = torch.arange(history_len).unsqueeze(0) < lengths.unsqueeze(1)
    ages = torch.rand(num_users, history_len, generator=g) * 96
    history = {
        "item_id": torch.where(mask, world.item_ids[hist_items], 0),
        "advertiser": torch.where(mask, world.item_advertiser[hist_items] + 1, 0),
        "category": torch.where(mask, world.item_category[hist_items] + 1, 0),
    }
    users = UserBatch(
        dense=torch.randn(num_users, 2, generator=g),
        sparse={"segment": (segment + 1).unsqueeze(1), "age_bucket": torch.randint(1, 6, (num_users, 1), generator=g)},
        history=history,
        history_age=torch.where(mask, ages, 0.0),
    )
    return users, segment


def true_logits(world: PlantedWorld, users: UserBatch, segment: Tensor, item_rows: Tensor, pair_user: Tensor) -> Tensor:
    adv = world.item_advertiser[item_rows] + 1
    hist_adv = users.history["advertiser"][pair_user]
    recent = torch.exp(-users.history_age[pair_user] / 12.0)
    match = ((hist_adv == adv.unsqueeze(1)) & (hist_adv > 0)).float()
    recency_bonus = (match * recent).amax(dim=1) * 3.0
    return (
        -2.0
        + world.affinity[segment[pair_user], world.item_category[item_rows]]
        + recency_bonus
        + (world.item_quality[item_rows])
    )


def make_batches(
    world: PlantedWorld, num_batches: int, batch_size: int, seed: int, users_per_batch: int | None = None
) -> list[TrainingBatch]:
    """Impressions from a uniform logging policy, half of them on items of the user's history advertisers."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(num_batches):
        users, segment = make_users(world, users_per_batch or batch_size, seed * 1000 + b)
        pair_user = torch.randint(len(users), (batch_size,), generator=g)
        item_rows = torch.randint(len(world.item_ids), (batch_size,), generator=g)
        # half the impressions go to an advertiser the user engaged with, so the recency signal shows up
        hist_adv = users.history["advertiser"][pair_user, 0] - 1
        same_adv = [torch.nonzero(world.item_advertiser == a).flatten() for a in hist_adv.tolist()]
        for i in range(0, batch_size, 2):
            if len(same_adv[i]):
                item_rows[i] = same_adv[i][torch.randint(len(same_adv[i]), (1,), generator=g)]
        logit = true_logits(world, users, segment, item_rows, pair_user)
        click = torch.bernoulli(torch.sigmoid(logit), generator=g)
        conversion = click * torch.bernoulli(torch.full_like(click, 0.3), generator=g)
        batches.append(
            TrainingBatch(
                users=users.select(pair_user),
                items=world.items.select(item_rows),
                labels=torch.stack([click, conversion], dim=1),
                item_keys=world.item_ids[item_rows],
            )
        )
    return batches


def briefly_trained(
    world: PlantedWorld,
    batches: int,
    seed: int,
    torch_seed: int = 3,
    num_nodes: tuple[int, ...] = (8, 4),
    batch_size: int = 128,
    users_per_batch: int = 32,
) -> HSNN:
    """A tiny HSNN trained on a few planted batches: a fixed model for tests and benches, not a good one."""
    torch.manual_seed(torch_seed)
    model = HSNN(tiny_hsnn_config(num_nodes=num_nodes))
    train(model, make_batches(world, batches, batch_size, seed=seed, users_per_batch=users_per_batch))
    return model.eval()


def user_json(users: UserBatch, row: int, age_decimals: int | None = None) -> dict:
    """One user of a batch as the API's JSON `user` (padding dropped; ages rounded if `age_decimals`)."""
    live = users.history["item_id"][row] > 0
    history = [
        {
            "attributes": {name: int(values[row, h]) for name, values in users.history.items()},
            "age_hours": _age(float(users.history_age[row, h]), age_decimals),
        }
        for h in torch.nonzero(live).flatten().tolist()
    ]
    sparse = {name: [i for i in ids[row].tolist() if i > 0] for name, ids in users.sparse.items()}
    return {"dense": users.dense[row].tolist(), "sparse": sparse, "history": history}


def _age(hours: float, decimals: int | None) -> float:
    return hours if decimals is None else round(hours, decimals)
