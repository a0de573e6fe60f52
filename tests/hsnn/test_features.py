"""Feature plumbing: hashing and I2IF, one implementation for training and serving."""

import torch

from hsnn.features import ItemBatch, UserBatch, hash_ids, interaction_features
from worlds.planted import SCHEMA, make_batches, make_users


def test_hash_keeps_padding_and_stays_in_range():
    ids = torch.tensor([0, 1, 2, 10**12, 2**40 + 7])
    hashed = hash_ids(ids, buckets=100, salt=3)
    assert hashed[0] == 0
    assert bool(((hashed[1:] >= 1) & (hashed[1:] < 100)).all())
    assert not torch.equal(hash_ids(ids, 100, salt=3), hash_ids(ids, 100, salt=4))


def test_ids_below_the_table_size_never_collide_and_large_ids_still_land_in_range():
    for buckets in (2, 97, 1_000, 40_983):
        ids = torch.arange(1, buckets - 1)  # every id below m = buckets - 1: a permutation, one row each
        rows = hash_ids(ids, buckets, salt=11)
        assert len(torch.unique(rows)) == len(rows)
    large = torch.tensor([10**12, 2**62, 7 * 10**9])
    rows = hash_ids(large, 1_000, salt=5)
    assert bool(((rows >= 1) & (rows < 1_000)).all())


def test_i2if_hand_computed():
    users = UserBatch(
        dense=torch.zeros(1, 2),
        sparse={"segment": torch.ones(1, 1, dtype=torch.long), "age_bucket": torch.ones(1, 1, dtype=torch.long)},
        history={
            "item_id": torch.tensor([[11, 12, 13, 0]]),
            "advertiser": torch.tensor([[5, 5, 7, 0]]),
            "category": torch.tensor([[2, 3, 3, 0]]),
        },
        history_age=torch.tensor([[48.0, 0.0, 24.0, 0.0]]),
    )
    items = ItemBatch(
        dense=torch.zeros(3, 4),
        sparse={
            "item_id": torch.tensor([1, 2, 3]),
            "advertiser": torch.tensor([5, 7, 9]),
            "category": torch.tensor([3, 9, 0]),
        },
    )
    out = interaction_features(SCHEMA, users, items, torch.zeros(3, dtype=torch.long), torch.arange(3))
    # advertiser: item 0 matches two events (ages 48, 0), item 1 one (age 24), item 2 none
    adv_count, adv_recency, adv_share = out.dense[:, 0], out.dense[:, 1], out.dense[:, 2]
    torch.testing.assert_close(adv_count, torch.log1p(torch.tensor([2.0, 1.0, 0.0])))
    torch.testing.assert_close(adv_recency, torch.tensor([1.0, torch.exp(torch.tensor(-1.0)).item(), 0.0]))
    torch.testing.assert_close(adv_share, torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert out.sparse["advertiser"].flatten().tolist() == [5, 7, 0]
    # category: item 0 (cat 3) matches ages 0 and 24; the missing category (0) never matches
    assert out.sparse["category"].flatten().tolist() == [3, 0, 0]
    torch.testing.assert_close(out.dense[:, 4], torch.tensor([1.0, 0.0, 0.0]))


def test_i2if_identical_in_training_and_serving_paths(world):
    """Training pairs row i with row i; serving pairs one user with many items: same numbers."""
    users, _ = make_users(world, 5, seed=3)
    item_rows = torch.arange(0, 200, 7)
    for u in range(len(users)):
        # serving: one user row, the catalogue's item rows
        serving = interaction_features(SCHEMA, users, world.items, torch.full((len(item_rows),), u), item_rows)
        # training: a batch where each impression row carries its own copy of the user
        pair_users = users.select(torch.full((len(item_rows),), u))
        rows = torch.arange(len(item_rows))
        training = interaction_features(SCHEMA, pair_users, world.items.select(item_rows), rows, rows)
        assert torch.equal(serving.dense, training.dense)
        for name in SCHEMA.interaction_attributes:
            assert torch.equal(serving.sparse[name], training.sparse[name])


def test_i2if_identical_through_model_embeddings(trained_hsnn, world):
    """The interaction tower sees the same inputs whether fed by a training batch or by serving."""
    batch = make_batches(world, 1, 16, seed=9)[0]
    model = trained_hsnn.item_model
    rows = torch.arange(16)
    as_training = model.encode_interactions(batch.users, batch.items, rows, rows)
    item_rows = torch.searchsorted(world.item_ids, batch.item_keys)
    as_serving = model.encode_interactions(batch.users, world.items, rows, item_rows)
    assert torch.equal(as_training, as_serving)
