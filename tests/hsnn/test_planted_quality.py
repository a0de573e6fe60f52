"""On a planted problem, the learned index beats a random one and MoNN beats Two Tower."""

import torch

from bench.metrics import recall_at_k
from hsnn.index import build_index
from hsnn.metrics import log_loss
from hsnn.monn import MoNN
from hsnn.serving import retrieve
from hsnn.training import predict, train
from worlds.planted import SCHEMA, make_batches, make_users, tiny_monn, true_logits


def _true_top(world, users, segment, k):
    num_items = len(world.item_ids)
    top = []
    for u in range(len(users)):
        logits = true_logits(world, users, segment, torch.arange(num_items), torch.full((num_items,), u))
        top.append(set(world.item_ids[torch.topk(logits, k).indices].tolist()))
    return top


def _recall_and_cost(model, index, users, truth, beams, k=50):
    results = retrieve(model, index, users, k=k, beams=beams)
    recall = recall_at_k([r.item_ids.tolist() for r in results], truth, k)
    return recall, sum(r.cost.items_scored for r in results) / len(results)


def test_learned_index_beats_random_index_at_equal_cost(trained_hsnn, world):
    users, segment = make_users(world, 64, seed=77)
    truth = _true_top(world, users, segment, 50)
    learned = build_index(trained_hsnn, world.item_ids, world.items)
    g = torch.Generator().manual_seed(5)
    sizes = learned.codebook_sizes
    random_paths = torch.stack([torch.randint(s, (len(world.item_ids),), generator=g) for s in sizes], dim=1)
    random = build_index(trained_hsnn, world.item_ids, world.items, paths=random_paths)

    learned_recall, learned_cost = _recall_and_cost(trained_hsnn, learned, users, truth, beams=[2, 2])
    # give the random index at least as many scored items as the learned one used
    for leaf_beam in range(2, len(random.levels[1].keys) + 1):
        random_recall, random_cost = _recall_and_cost(trained_hsnn, random, users, truth, beams=[sizes[0], leaf_beam])
        if random_cost >= learned_cost:
            break
    assert random_cost >= learned_cost
    assert learned_recall > random_recall + 0.05, (learned_recall, learned_cost, random_recall, random_cost)


def test_monn_beats_two_tower_on_held_out_log_loss(world, train_batches):
    """Averaged over three initialisations: one seed's margin is within the run-to-run spread."""
    held_out = make_batches(world, 4, 512, seed=2, users_per_batch=128)
    losses = {"two_tower": 0.0, "monn": 0.0}
    for seed in range(3):
        for name, config in {
            "two_tower": tiny_monn(dot_product=True, interaction=False),
            "monn": tiny_monn(),
        }.items():
            torch.manual_seed(seed)
            model = MoNN(config, SCHEMA)
            train(model, train_batches * 4)
            losses[name] += sum(log_loss(predict(model, b)[:, 0], b.labels[:, 0]) for b in held_out) / len(held_out) / 3
    assert losses["monn"] < losses["two_tower"] * 0.995, losses
