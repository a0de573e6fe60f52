"""In-process check of beam search against exhaustive scoring (no service): recall@k of `hsnn.serving.retrieve`
at an items budget's beams vs the same model's `retrieve_exhaustive` top-k.

    python -m bench.serving_recall --ads 10000 --train-steps 60 --items-budget 2000

The load generator reports the same figure per row through the service; this is the quick loop for the model
and trainer changes that move it (train length, presets, level objectives).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from bench.exhaustive import retrieve_exhaustive
from bench.sizing import SERVING_WIDENING, beams_for_budget, index_shape
from clitools.arguments import float_above, int_at_least
from hsnn.features import UserBatch
from hsnn.index import HierarchicalIndex, build_index
from hsnn.model import HSNN
from hsnn.serving import retrieve


def recall_vs_exhaustive(
    model: HSNN, index: HierarchicalIndex, users: UserBatch, beams: list[int], k: int
) -> dict[str, float]:
    """Mean recall@k of the beam-searched top-k vs the exhaustive top-k, and the mean items scored per user."""
    truth = retrieve_exhaustive(model, index, users, k=k)
    served = retrieve(model, index, users, k=k, beams=beams)
    recalls = [
        len(set(s.item_ids.tolist()) & set(t.item_ids.tolist())) / max(1, len(t.item_ids))
        for s, t in zip(served, truth, strict=True)
    ]
    items_scored = sum(s.cost.items_scored for s in served) / len(served)
    return {
        "recall": sum(recalls) / len(recalls),
        "items_scored": items_scored,
        "index_ceiling": index_ceiling(index, truth, items_scored, k),
        "leaves_holding_top_k": sum(len(torch.unique(index.item_nodes[t.rows, -1])) for t in truth) / len(truth),
    }


def index_ceiling(index: HierarchicalIndex, truth: list, items_budget: float, k: int) -> float:
    """The recall perfect level models would reach scoring about as many items: per user, whole leaves taken
    greedily by how many of its exhaustive top-k they hold, until the budget is spent. Below 0.9 the index
    itself scatters what users want (no level objective can fix that); above it, the level models are short."""
    sizes = index.levels[-1].sizes
    total = 0.0
    for result in truth:
        held = torch.bincount(index.item_nodes[result.rows, -1], minlength=len(sizes))  # (leaves,)
        order = torch.argsort(held, descending=True)
        within = torch.cumsum(sizes[order], 0) <= items_budget
        total += float(held[order][within].sum()) / max(1, len(result.rows))
    return total / len(truth)


def main(argv: list[str] | None = None) -> None:
    from bench.loadgen import ADVERTISERS_PER_CATEGORY, CATEGORIES, scaled_catalog, train_model
    from worlds.planted import make_users, make_world

    parser = argparse.ArgumentParser(prog="python -m bench.serving_recall", description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int_at_least(1), nargs="+", default=[10_000])
    parser.add_argument("--train-steps", type=int_at_least(1), default=60)
    parser.add_argument("--items-budget", type=int_at_least(1), nargs="+", default=[2000])
    parser.add_argument(
        "--widening",
        type=float_above(1.0, inclusive=True),
        nargs="+",
        default=[SERVING_WIDENING],
        help="parents kept per level: this many x the parents the next level's beam needs (beams_for_budget)",
    )
    parser.add_argument("--model", default="tiny", help="tiny or paper (MoNN-Small items, Large/Medium levels)")
    parser.add_argument("--users", type=int_at_least(1), default=32)
    parser.add_argument("--k", type=int_at_least(1), default=100)
    parser.add_argument("--set", nargs="*", default=[], help="HSNNConfig overrides, key=JSON value")
    parser.add_argument(
        "--stale-history",
        action="store_true",
        help="query users whose engagements are all old: what recall is without the recency signal that only the "
        "item model's I2IF sees (level models read no interaction features)",
    )
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads (1: robust on a shared box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = make_world(num_items=20_000, num_categories=CATEGORIES, advertisers_per_category=ADVERTISERS_PER_CATEGORY)
    users = make_users(base, args.users, seed=99)[0]
    if args.stale_history:  # every engagement old: the recency signal only I2IF carries is gone for these users
        users.history_age = torch.where(users.history["item_id"] > 0, 1000.0, 0.0)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        try:
            overrides[key] = json.loads(value) if sep else parser.error(f"--set wants key=JSON, got {item!r}")
        except json.JSONDecodeError as err:
            parser.error(f"--set {key}: not JSON ({err})")
    for num_items in args.ads:
        nodes = index_shape(num_items)
        started = time.perf_counter()
        model = train_model(base, args.train_steps, tuple(nodes), seed=0, model=args.model, **overrides)
        train_s = time.perf_counter() - started
        catalog = scaled_catalog(base, num_items, seed=num_items)
        started = time.perf_counter()
        index = build_index(model, catalog.item_ids, catalog.items)
        build_s = time.perf_counter() - started
        for budget, widening in itertools.product(args.items_budget, args.widening):
            beams = beams_for_budget(nodes, num_items, budget, widening)
            row = {
                "ads": num_items,
                "model": args.model,
                "set": overrides,
                "train_steps": args.train_steps,
                "nodes": nodes,
            }
            row |= {"budget": budget, "widening": widening, "beams": beams}
            row |= {"train_s": round(train_s, 1), "build_s": round(build_s, 1)}
            row |= recall_vs_exhaustive(model, index, users, beams, args.k)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
