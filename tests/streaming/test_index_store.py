"""The pure parts of the Redis index store: blob encoding, catalogue values, deltas on an in-memory index."""

from __future__ import annotations

import pytest
import torch

from bench.exhaustive import retrieve_exhaustive
from hsnn.index import build_index
from hsnn.model import HSNN
from hsnn.serving import retrieve
from streaming.events import ItemEvent, ItemFeatures
from streaming.index_store import (
    CatalogEntry,
    ItemEncoder,
    apply_delta,
    catalog_to_batch,
    decode_blob,
    encode_blob,
    fits_schema,
)
from worlds.planted import SCHEMA, briefly_trained, make_users, make_world


@pytest.fixture(scope="module")
def world():
    return make_world(num_items=400, seed=3)


@pytest.fixture(scope="module")
def small_hsnn(world) -> HSNN:
    """A briefly trained tiny HSNN (a few steps: the tests need a fixed model, not a good one)."""
    return briefly_trained(world, batches=6, seed=4)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(-5, 1000, dtype=torch.long).reshape(5, -1) * (2**40),
        torch.randn(7, 3, 16),
        torch.rand(33) > 0.5,
        torch.empty(0, 4),
    ],
)
def test_blob_round_trip_is_exact(tensor):
    spec, chunks = encode_blob(tensor, chunk_bytes=64)
    assert spec["chunks"] == len(chunks) and all(len(c) <= 64 for c in chunks)
    out = decode_blob(spec, chunks)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_blob_refuses_other_dtypes_and_damaged_chunks():
    with pytest.raises(TypeError):
        encode_blob(torch.zeros(3, dtype=torch.float64))
    spec, chunks = encode_blob(torch.arange(100), chunk_bytes=128)
    with pytest.raises(ValueError):
        decode_blob(spec, [*chunks[:-1], None])
    with pytest.raises(ValueError):
        decode_blob(spec, [*chunks[:-1], chunks[-1][:-8]])


def _event(ad_id: int, seq: int, dense, advertiser: int, category: int, op: str = "create") -> ItemEvent:
    features = ItemFeatures(dense=list(dense), sparse={"advertiser": advertiser, "category": category})
    return ItemEvent(op=op, ad_id=ad_id, event_time=1.7e9 + seq, sequence=seq, features=features)


def test_catalog_entry_value_round_trip_and_schema_fit():
    entry = CatalogEntry.from_event(_event(12, 3, [0.1, 0.2, 0.3, 1 / 3], 7, 2))
    parsed = CatalogEntry.parse(b"12", entry.value().encode())
    assert parsed == entry and parsed.live and fits_schema(parsed, SCHEMA)
    expired = CatalogEntry.from_event(ItemEvent(op="expire", ad_id=12, event_time=1.8e9, sequence=4))
    assert not CatalogEntry.parse(12, expired.value()).live and not fits_schema(expired, SCHEMA)
    short = CatalogEntry(5, 1, 1.0, True, {"dense": [1.0], "sparse": {}})
    assert not fits_schema(short, SCHEMA)
    batch = catalog_to_batch([entry], SCHEMA)
    assert batch.sparse["item_id"].tolist() == [12] and batch.sparse["advertiser"].tolist() == [7]
    assert torch.equal(batch.dense, torch.tensor([[0.1, 0.2, 0.3, 1 / 3]]))


def _entries(world, rows) -> list[CatalogEntry]:
    return [
        CatalogEntry.from_event(
            _event(
                int(world.item_ids[r]),
                1,
                world.items.dense[r].tolist(),
                int(world.items.sparse["advertiser"][r]),
                int(world.items.sparse["category"][r]),
            )
        )
        for r in rows
    ]


def test_delta_adds_ads_to_existing_and_new_leaves(small_hsnn, world):
    model = small_hsnn
    # plain argmin paths: a capped build would spread the remaining ads into the emptied node
    full = build_index(model, world.item_ids, world.items, capacity_factor=None)
    # a whole top-level node left out of the base index: its ads come back in brand-new nodes;
    # one ad of the biggest leaf left out too: it comes back into an existing leaf
    top_sizes = full.levels[0].sizes
    small_top = int(torch.nonzero(top_sizes == top_sizes[top_sizes > 0].min()).flatten()[0])
    new_node_rows = torch.nonzero(full.item_nodes[:, 0] == small_top).flatten()
    big_leaf = int(full.levels[-1].sizes.argmax())
    existing_leaf_row = int(torch.nonzero(full.item_nodes[:, -1] == big_leaf).flatten()[0])
    added = torch.cat([new_node_rows, torch.tensor([existing_leaf_row])])
    keep = torch.ones(len(world.item_ids), dtype=torch.bool)
    keep[added] = False
    base = build_index(
        model, world.item_ids[keep], world.items.select(torch.nonzero(keep).flatten()), capacity_factor=None
    )
    assert int(full.paths[added[0], 0]) not in base.paths[:, 0].tolist()
    assert full.paths[existing_leaf_row].tolist() in base.paths.tolist()

    delta = ItemEncoder(model, index_version=1).encode(_entries(world, added.tolist()))
    assert [d["path"] for d in delta] == full.paths[added].tolist()
    grown = apply_delta(base, model, delta)
    assert base.num_items == int(keep.sum())  # the base index is left alone
    for lvl in range(len(full.levels)):
        assert torch.equal(grown.levels[lvl].keys, full.levels[lvl].keys)
        assert torch.equal(grown.levels[lvl].sizes, full.levels[lvl].sizes)

    users = make_users(world, 4, seed=5)[0]
    wide = [len(level.keys) for level in grown.levels]
    everything = len(world.item_ids)
    layered = retrieve(model, grown, users, k=everything, beams=wide)
    exhaustive = retrieve_exhaustive(model, grown, users, k=everything)
    fresh = retrieve_exhaustive(model, full, users, k=everything)
    new_ids = set(world.item_ids[added].tolist())
    for a, b, c in zip(layered, exhaustive, fresh, strict=True):
        assert new_ids <= set(a.item_ids.tolist())
        assert a.item_ids.tolist() == b.item_ids.tolist()
        torch.testing.assert_close(a.scores, b.scores)
        assert sorted(a.item_ids.tolist()) == sorted(c.item_ids.tolist())
        # same items, same paths, same node embeddings: the same score as a full rebuild gives
        score_new = dict(zip(a.item_ids.tolist(), a.scores.tolist(), strict=True))
        score_full = dict(zip(c.item_ids.tolist(), c.scores.tolist(), strict=True))
        for ad in new_ids:
            assert score_new[ad] == pytest.approx(score_full[ad], abs=1e-5)


def test_delta_update_replaces_and_expire_removes(small_hsnn, world):
    model = small_hsnn
    rows = torch.arange(200)
    base = build_index(model, world.item_ids[rows], world.items.select(rows))
    moved = _entries(world, [150])[0]  # ad 1 takes the features of row 150
    update = CatalogEntry(1, 2, 2e9, True, moved.features)
    delta = ItemEncoder(model, index_version=1).encode([update])
    delta.append({"op": "expire", "ad_id": 2, "sequence": 9, "event_time": 2e9})
    out = apply_delta(base, model, delta)
    assert out.num_items == 201
    ad1 = torch.nonzero(out.item_ids == 1).flatten()
    assert out.live[ad1].tolist() == [False, True]
    assert torch.equal(out.items.dense[ad1[1]], world.items.dense[150])
    assert out.paths[ad1[1]].tolist() == delta[0]["path"]
    assert not bool(out.live[out.item_ids == 2].any())
    users = make_users(world, 3, seed=8)[0]
    wide = [len(level.keys) for level in out.levels]
    for result in retrieve(model, out, users, k=300, beams=wide):
        ids = result.item_ids.tolist()
        assert ids.count(1) == 1 and 2 not in ids and len(ids) == 199
