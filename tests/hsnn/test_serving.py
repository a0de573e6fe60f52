"""Layer-wise serving: equals exhaustive scoring with full beams, costs less with narrow ones."""

import pytest
import torch

from bench.exhaustive import retrieve_exhaustive
from hsnn.index import build_index, expand_ranges
from hsnn.serving import retrieve
from worlds.planted import make_users


@pytest.fixture(scope="module")
def index(trained_hsnn, world):
    return build_index(trained_hsnn, world.item_ids, world.items)


@pytest.fixture(scope="module")
def users(world):
    return make_users(world, 6, seed=21)[0]


def test_index_layout_is_consistent(index, world):
    leaf = index.levels[-1]
    assert int(leaf.sizes.sum()) == len(world.item_ids)
    # every item sits under its own leaf's CSR range, and children ranges tile the next level
    for leaf_row in range(len(leaf.keys)):
        members = index.leaf_items[leaf.child_offsets[leaf_row] : leaf.child_offsets[leaf_row + 1]]
        assert bool((index.item_nodes[members, -1] == leaf_row).all())
    top = index.levels[0]
    assert int(top.child_offsets[-1]) == len(index.levels[1].keys)
    # a representative is a member of its node and the closest member to the node embedding
    for node in range(len(top.keys)):
        members = torch.nonzero(index.item_nodes[:, 0] == node).flatten()
        assert int(top.representative[node]) in members.tolist()
        cumulative = index.item_embeddings.flatten(1)[members]
        assert cumulative.shape[0] == int(top.sizes[node])


def test_expand_ranges():
    offsets = torch.tensor([0, 2, 5, 6])
    rows, counts = expand_ranges(offsets, torch.tensor([2, 0]))
    assert rows.tolist() == [5, 0, 1] and counts.tolist() == [1, 2]


def test_full_beams_equal_exhaustive_top_k(trained_hsnn, index, users):
    wide = [len(level.keys) for level in index.levels]
    layered = retrieve(trained_hsnn, index, users, k=25, beams=wide)
    exhaustive = retrieve_exhaustive(trained_hsnn, index, users, k=25)
    for a, b in zip(layered, exhaustive, strict=True):
        assert a.item_ids.tolist() == b.item_ids.tolist()
        torch.testing.assert_close(a.scores, b.scores)
        assert a.cost.items_scored == b.cost.items_scored == index.num_items


def test_narrow_beams_score_fewer_items(trained_hsnn, index, users):
    narrow = retrieve(trained_hsnn, index, users, k=10, beams=[2, 2])
    for result in narrow:
        assert 0 < result.cost.items_scored < index.num_items
        assert result.cost.nodes_scored < index.num_items
        assert len(result.item_ids) == min(10, result.cost.items_scored)
        assert bool((result.scores[:-1] >= result.scores[1:]).all())
    wide = retrieve(trained_hsnn, index, users, k=10, beams=[8, 32])
    assert sum(r.cost.flops for r in narrow) < sum(r.cost.flops for r in wide)


def test_batched_users_match_one_at_a_time(trained_hsnn, index, users):
    together = retrieve(trained_hsnn, index, users, k=15, beams=[3, 3])
    for u in range(len(users)):
        alone = retrieve(trained_hsnn, index, users.select(torch.tensor([u])), k=15, beams=[3, 3])[0]
        assert alone.item_ids.tolist() == together[u].item_ids.tolist()


def test_expired_and_excluded_items_are_never_returned(trained_hsnn, world, users):
    index = build_index(trained_hsnn, world.item_ids, world.items)
    first = retrieve_exhaustive(trained_hsnn, index, users, k=5)[0].item_ids
    assert index.expire(first[:2]) == 2
    exclude = [first[2:3]] + [None] * (len(users) - 1)
    wide = [len(level.keys) for level in index.levels]
    for result in (
        retrieve(trained_hsnn, index, users, k=5, beams=wide, exclude=exclude)[0],
        retrieve_exhaustive(trained_hsnn, index, users, k=5, exclude=exclude)[0],
    ):
        assert not set(first[:3].tolist()) & set(result.item_ids.tolist())
        assert result.item_ids.tolist()[:2] == first[3:5].tolist()


def test_beam_count_must_match_levels(trained_hsnn, index, users):
    with pytest.raises(ValueError, match="one beam width per index level"):
        retrieve(trained_hsnn, index, users, k=5, beams=[3])


def test_split_first_layer_equals_plain_pair_logits(trained_hsnn, index, users):
    """The precomputed item halves (index tables) plus W_u u and W_x x give pair_logits' logits."""
    from hsnn.serving import score_items, score_nodes

    torch.manual_seed(3)
    for level_idx, level_model in enumerate(trained_hsnn.level_models):
        assert index.levels[level_idx].first is not None
        user_emb = level_model.encode_users(users)  # (U, n_u, d)
        pair_node = torch.randint(len(index.levels[level_idx].keys), (50,))
        pair_user = torch.randint(len(users), (50,))
        plain = level_model.pair_logits(user_emb[pair_user], index.levels[level_idx].projected[pair_node], None)
        fast = score_nodes(level_model, level_idx, index, user_emb, pair_user, pair_node)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    item_model = trained_hsnn.item_model
    assert index.item_first is not None and item_model.interaction_tower is not None
    user_emb = item_model.encode_users(users)
    rows, pair_user = torch.randint(index.num_items, (200,)), torch.randint(len(users), (200,))
    interaction = item_model.encode_interactions(users, index.items, pair_user, rows)
    plain = item_model.pair_logits(user_emb[pair_user], index.item_embeddings[rows], interaction)
    fast = score_items(item_model, index, users, user_emb, pair_user, rows)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    # and the reported per-pair cost drops by exactly the user and item columns of the first Linear
    assert item_model.pair_flops(True) < item_model.pair_flops()


def test_precomputed_and_plain_scoring_retrieve_the_same(trained_hsnn, index, users):
    fast = retrieve(trained_hsnn, index, users, k=20, beams=[3, 3])
    plain = retrieve(trained_hsnn, index, users, k=20, beams=[3, 3], precomputed=False)
    for a, b in zip(fast, plain, strict=True):
        assert a.item_ids.tolist() == b.item_ids.tolist()
        torch.testing.assert_close(a.scores, b.scores)


def test_item_delta_rebuilds_the_tables(trained_hsnn, index, world):
    """An appended or updated item gets its own row in the item-half table (the index is relaid out)."""
    extra = world.items.select(torch.tensor([0, 1]))
    grown = index.with_items(trained_hsnn, torch.tensor([10**9, 10**9 + 1]), extra)
    assert grown.item_first is not None and grown.item_first.shape[0] == grown.num_items == index.num_items + 2
    expected = trained_hsnn.item_model.item_first(grown.item_embeddings[-2:])
    torch.testing.assert_close(grown.item_first[-2:], expected)


def test_an_updated_ad_scores_with_its_new_features_and_its_old_row_never_appears(trained_hsnn, index, users):
    """Issue 13: an item delta relays the tables out. Ad X given ad Y's features (an update: append + expire)
    scores exactly as Y does under wide beams, with the precomputed tables; its old row is never served."""
    x_id, y_row = index.item_ids[0], 1
    updated = index.with_items(trained_hsnn, x_id.view(1), index.items.select(torch.tensor([y_row])))
    wide = [len(level.keys) for level in updated.levels]
    for result in retrieve(trained_hsnn, updated, users, k=updated.num_items, beams=wide):
        ids, rows = result.item_ids.tolist(), result.rows.tolist()
        assert ids.count(int(x_id)) == 1 and 0 not in rows  # the new row only
        x_score = result.scores[ids.index(int(x_id))]
        y_score = result.scores[ids.index(int(index.item_ids[y_row]))]
        torch.testing.assert_close(x_score, y_score)
    torch.testing.assert_close(updated.item_first[-1], updated.item_first[y_row])


def test_wide_beams_equal_exhaustive_scores_with_the_tables(trained_hsnn, index, users):
    """Wide beams through the precomputed tables give the exhaustive top-k and its scores, not just its ids."""
    wide = [len(level.keys) for level in index.levels]
    assert index.item_first is not None and all(level.first is not None for level in index.levels)
    served = retrieve(trained_hsnn, index, users, k=30, beams=wide)
    truth = retrieve_exhaustive(trained_hsnn, index, users, k=30)
    for a, b in zip(served, truth, strict=True):
        assert a.item_ids.tolist() == b.item_ids.tolist()
        torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the loadgen's --device cuda path)")
def test_retrieval_on_cuda_matches_cpu(trained_hsnn, index, users):
    """The GPU path: model and index moved to CUDA retrieve what the CPU does (skipped where there is no GPU)."""
    import copy

    model = copy.deepcopy(trained_hsnn).cuda()
    on_gpu = retrieve(model, index.to("cuda"), users.to("cuda"), k=20, beams=[3, 3])
    on_cpu = retrieve(trained_hsnn, index, users, k=20, beams=[3, 3])
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert a.item_ids.cpu().tolist() == b.item_ids.tolist()
        torch.testing.assert_close(a.scores.cpu(), b.scores, rtol=1e-4, atol=1e-5)


def test_index_to_a_device_keeps_every_table(index):
    moved = index.to("cpu")
    assert moved.item_first is not None and all(level.first is not None for level in moved.levels)
    assert torch.equal(moved.leaf_items, index.leaf_items) and moved.device.type == "cpu"
