"""What should an index cluster? Oracle cost of k-means over candidate item representations.

The learned index clusters the item tower's output, and on the simulator that index needs about
2.5x the items of the given category -> advertiser hierarchy to cover half of a user's true top-100
(the oracle cost, `bench.index_quality`). This bench separates the representation from everything
else: it trains one item-level MoNN, builds residual k-means indexes of several shapes over

- `item_embedding`: the item tower's output (what the LTI reads today);
- `score_profile`: the MoNN's click logits for K probe users drawn from the training stream (an
  item is described by who would click it);
- `score_profile_centred`: the same, centred per probe user and scaled to unit length per item;
- `score_profile_no_history_match`: the profile with the I2IF input computed against an empty
  history (what a profile costs to store: no raw probe histories), the user tower still reading them;

and reports the oracle cost of each next to the given hierarchy, over several seeds.

    python -m bench.index_inputs --seeds 3 --out reports/index_inputs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.data import simulator_data
from bench.harness import BenchData, train_for
from bench.index_quality import min_cover_cost
from bench.methods import residual_kmeans
from bench.run import _model_config
from clitools.progress import progress_bar
from hsnn.monn import MoNN

REPRESENTATIONS = ("item_embedding", "score_profile", "score_profile_centred", "score_profile_no_history_match")


def leaf_oracle_cost(leaf: Tensor, true_rows: Tensor, share: float = 0.5, top: int = 100) -> float:
    """Mean over users of the fewest items whose leaves cover `share` of the user's true top-`top`."""
    sizes = np.bincount(leaf.numpy())
    need = math.ceil(share * top)
    costs = []
    for rows in true_rows[:, :top]:
        leaves, hits = torch.unique(leaf[rows], return_counts=True)
        costs.append(min_cover_cost(hits.numpy(), sizes[leaves.numpy()], need))
    return float(np.mean(costs))


@torch.no_grad()
def score_profiles(model: MoNN, data: BenchData, probes: int, seed: int, history_match: bool = True) -> Tensor:
    """(N, probes) click logits of every catalogue item for `probes` users from the training stream.

    Without `history_match` the I2IF input is computed for a user with an empty history."""
    model.eval()
    users = next(iter(data.batches(1, seed + 10_000))).users
    rows = torch.randperm(len(users), generator=torch.Generator().manual_seed(seed))[:probes]
    probe = users.select(rows)
    user_emb = model.encode_users(probe)  # (K, n_user, d)
    nobody = probe.select(torch.zeros(len(rows), dtype=torch.long))
    nobody.history = {name: torch.zeros_like(ids) for name, ids in nobody.history.items()}
    item_emb = model.encode_items(data.items)  # (N, n_item, d)
    items = torch.arange(data.num_items)
    profile = torch.empty(data.num_items, len(rows))
    for u in progress_bar(range(len(rows)), "score profiles"):
        pair_user = torch.full((data.num_items,), u)
        interaction = model.encode_interactions(probe if history_match else nobody, data.items, pair_user, items)
        profile[:, u] = model.pair_logits(user_emb[pair_user], item_emb, interaction)[:, 0]
    return profile


def run_seed(seed: int, items: int, steps: int, probes: int, shapes: list[list[int]]) -> dict:
    torch.manual_seed(seed)
    data = simulator_data(items, num_users=max(10_000, items // 10), num_eval_users=100, train_batches=steps, seed=seed)
    model = MoNN(_model_config("monn_small", quick=True), data.schema)
    train_for(model, data, steps, seed, "monn")
    truth = data.true_top(200)
    assert truth is not None and data.hierarchy is not None
    true_rows = torch.stack([data.rows_of(torch.tensor(t[:100])) for t in truth])
    with torch.no_grad():
        embedding = model.encode_items(data.items).flatten(1)
    profile = score_profiles(model, data, probes, seed)
    centred = profile - profile.mean(dim=0, keepdim=True)
    vectors = {
        "item_embedding": embedding,
        "score_profile": profile,
        "score_profile_centred": centred / centred.norm(dim=1, keepdim=True).clamp(min=1e-6),
        "score_profile_no_history_match": score_profiles(model, data, probes, seed, history_match=False),
    }
    result: dict = {"seed": seed, "oracle_cost": {}}
    for shape in shapes:
        key = "x".join(map(str, shape))
        for name in REPRESENTATIONS:
            paths, _ = residual_kmeans(vectors[name], shape, seed)
            leaf = torch.zeros(len(paths), dtype=torch.long)
            for level, size in enumerate(shape):
                leaf = leaf * size + paths[:, level]
            result["oracle_cost"][f"{name} {key}"] = leaf_oracle_cost(leaf, true_rows)
    hierarchy = data.hierarchy
    leaf = hierarchy[:, 0] * (int(hierarchy[:, 1].max()) + 1) + hierarchy[:, 1]
    result["oracle_cost"]["given hierarchy"] = leaf_oracle_cost(leaf, true_rows)
    result["num_items"] = data.num_items
    return result


def write_report(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "index_inputs.json", out / "index_inputs.md"
    json_path.write_text(json.dumps(report, indent=2))
    names = list(report["runs"][0]["oracle_cost"])
    lines = [
        "# What the index clusters: oracle cost by item representation",
        "",
        f"{report['date']}; quick simulator, {report['runs'][0]['num_items']:,} ads, item-level MoNN trained "
        f"{report['steps']} steps, {report['probes']} probe users, seeds {report['seeds']}; wall time "
        f"{report['wall_seconds'] / 60:.1f} min. Command: `{report['command']}`",
        "",
        "Fewest items an ideal leaf-picker scores to cover half of a user's true top-100 (mean over 100 users;"
        " lower is a better index). Residual k-means of the given shape over each representation.",
        "",
        "| representation, shape | oracle cost (mean ± std over seeds) |",
        "| --- | ---: |",
    ]
    for name in names:
        values = np.array([run["oracle_cost"][name] for run in report["runs"]])
        lines.append(f"| {name} | {values.mean():.0f} ± {values.std():.0f} |")
    md_path.write_text("\n".join(lines) + "\n")
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.index_inputs", description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--probes", type=int, default=256)
    parser.add_argument("--shapes", default="7x7,16x3,48x1", help="comma-separated codebook shapes, e.g. 7x7,16x3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="reports/index_inputs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [[int(n) for n in shape.split("x")] for shape in args.shapes.split(",")]
    started = time.perf_counter()
    runs = [run_seed(seed, args.items, args.steps, args.probes, shapes) for seed in range(args.seeds)]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m bench.index_inputs " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": list(range(args.seeds)),
        "steps": args.steps,
        "probes": args.probes,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    for path in write_report(report, Path(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
