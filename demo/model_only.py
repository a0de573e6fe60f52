"""Quick demo of the core on the planted problem: train, index, serve layer-wise, compare.

Run with `python -m demo.model_only` (or ./scripts/demo.sh, which installs first). It trains a
small HSNN and a Two Tower model side by side, builds the learned index, and prints what
layer-wise retrieval costs and finds against exhaustive scoring and the planted truth.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.exhaustive import retrieve_exhaustive
from bench.metrics import recall_at_k
from bench.platt import calibrated_click_probs
from clitools.progress import progress_bar
from hsnn.index import build_index
from hsnn.metrics import index_health, normalized_entropy
from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.serving import retrieve
from hsnn.training import make_optimizer, train_step
from worlds.planted import SCHEMA, make_batches, make_users, make_world, tiny_hsnn_config, tiny_monn, true_logits


def _train(model: torch.nn.Module, batches: list, epochs: int, label: str) -> float:
    optimizer = make_optimizer(model)
    started = time.perf_counter()
    for _ in progress_bar(range(epochs), f"training {label} (epochs)"):
        for batch in batches:
            train_step(model, batch, optimizer)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.model_only", description=__doc__)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    world = make_world(num_items=args.items, num_categories=16, seed=args.seed)
    train_batches = make_batches(world, 40, 256, seed=1, users_per_batch=64)
    held_out = make_batches(world, 4, 512, seed=2, users_per_batch=128)

    hsnn = HSNN(tiny_hsnn_config(num_nodes=(16, 8)))
    two_tower = MoNN(tiny_monn(dot_product=True, interaction=False), SCHEMA)
    hsnn_seconds = _train(hsnn, train_batches, args.epochs, "HSNN")
    _train(two_tower, train_batches, args.epochs, "Two Tower")
    labels = torch.cat([b.labels[:, 0] for b in held_out[1:]])
    ne = {  # both Platt-scaled on the first held-out batch, measured on the rest
        name: normalized_entropy(calibrated_click_probs(model, held_out[0], held_out[1:]), labels)
        for name, model in (("HSNN", hsnn), ("Two Tower", two_tower))
    }
    index = build_index(hsnn, world.item_ids, world.items, progress=True)
    health = index_health(index.item_nodes[:, 0], index.codebook_sizes[0])

    users, segment = make_users(world, 100, seed=99)
    num_items = len(world.item_ids)
    truth = [
        set(
            world.item_ids[
                torch.topk(
                    true_logits(world, users, segment, torch.arange(num_items), torch.full((num_items,), u)), 50
                ).indices
            ].tolist()
        )
        for u in range(len(users))
    ]
    exhaustive = retrieve_exhaustive(hsnn, index, users, k=50)
    exhaustive_top = [set(r.item_ids.tolist()) for r in exhaustive]

    print(
        f"\ntrained HSNN for {hsnn_seconds:.1f}s; held-out NE: HSNN {ne['HSNN']:.4f}, "
        f"Two Tower {ne['Two Tower']:.4f} ({100 * (ne['HSNN'] / ne['Two Tower'] - 1):+.1f}%)"
    )
    print(
        f"level-1 index: {int(health['used_nodes'])}/{int(health['nodes'])} nodes used, "
        f"max/mean size {health['max_over_mean']:.2f}, entropy {health['entropy']:.2f}"
    )
    print(
        f"\n{'beams':>10} {'items scored':>13} {'MFLOPs/query':>13} {'recall@50 vs exhaustive':>24} "
        f"{'recall@50 vs truth':>19}"
    )
    for beams in ([2, 2], [4, 6], [8, 16], [16, 128]):
        results = retrieve(hsnn, index, users, k=50, beams=beams)
        found = [r.item_ids.tolist() for r in results]
        items = sum(r.cost.items_scored for r in results) / len(results)
        flops = sum(r.cost.flops for r in results) / len(results) / 1e6
        print(
            f"{beams!s:>10} {items:>13.0f} {flops:>13.1f} {recall_at_k(found, exhaustive_top, 50):>24.3f} "
            f"{recall_at_k(found, truth, 50):>19.3f}"
        )
    found = [r.item_ids.tolist() for r in exhaustive]
    flops = exhaustive[0].cost.flops / 1e6
    print(f"{'exhaustive':>10} {num_items:>13} {flops:>13.1f} {1.0:>24.3f} {recall_at_k(found, truth, 50):>19.3f}")


if __name__ == "__main__":
    main()
