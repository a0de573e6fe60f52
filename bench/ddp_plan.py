"""The arithmetic for 10^5-10^6 events/s, from measured figures (reports/trainer_ddp.json) and the model's shape.

    python -m bench.ddp_plan                       # the newest label in reports/trainer_ddp.json
    python -m bench.ddp_plan --label ddp --targets 100000,1000000 --ids 1e6,1e7,1e8

Nothing here is measured anew except the model's parameter split (built from the same config as the
bench: `HSNNConfig()` on the simulator's schema). Per-rank events/s, the allreduce of the dense parameter
bytes on loopback gloo and the snapshot files come from the bench run named by `--label`. The output is
the markdown table docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from torch import nn

REPORT = Path(__file__).resolve().parents[1] / "reports" / "trainer_ddp.json"


def parameter_split(ads: int = 2_000, users: int = 5_000, seed: int = 0) -> dict[str, int]:
    """Parameter counts of the bench's model: embedding tables vs everything else (dense)."""
    from hsnn.config import HSNNConfig
    from hsnn.model import HSNN
    from worlds.simulator import feature_schema, scaled_config

    model = HSNN(HSNNConfig(features=feature_schema(scaled_config(ads, users, seed))))
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag))
    total = sum(p.numel() for p in model.parameters())
    dims = sorted({m.weight.shape[1] for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)})
    return {"total": total, "tables": tables, "dense": total - tables, "table_dim": max(dims)}


def plan(run: dict, split: dict[str, int], targets: list[float], ids: list[float]) -> list[str]:
    runs = run["runs"]
    one = next(r for r in runs.values() if r["ranks"] == 1)
    multi = [r for r in runs.values() if r["ranks"] > 1 and not r.get("independent")]
    group = max(multi, key=lambda r: r["events_per_second"]) if multi else one
    per_rank = group["events_per_second"] / group["ranks"]
    batch = run["batch_size"]
    dense_bytes = 4 * split["dense"]
    table_bytes = 4 * split["tables"]
    allreduce = next((r["allreduce_seconds"] for r in group["per_rank"] if r["allreduce_seconds"]), None)
    snapshot = next((r["snapshot_bytes"] for r in one["per_rank"] if r["snapshot_bytes"]), {}) or {}
    snapshot_total = sum(snapshot.values())
    out = [
        f"Measured (label run: commit {run['commit']}, {run['cores']} cores, batch {batch} per rank):",
        "",
        f"- one rank ({one['threads_per_rank']} threads): {one['events_per_second']:,.1f} events/s; "
        f"{group['ranks']} ranks: {group['events_per_second']:,.1f} events/s, i.e. {per_rank:,.1f} per rank "
        f"({group['events_per_second'] / one['events_per_second']:.2f}x one rank)",
        f"- parameters: {split['total']:,} = {split['dense']:,} dense ({dense_bytes / 1e6:,.1f} MB fp32) + "
        f"{split['tables']:,} in embedding tables ({table_bytes / 1e6:,.2f} MB)",
        f"- one allreduce of the dense bytes, {group['ranks']} ranks, gloo on loopback: "
        + (f"{1e3 * allreduce:,.1f} ms" if allreduce else "not measured"),
        f"- snapshot: {snapshot_total / 1e6:,.1f} MB ("
        + ", ".join(f"{k} {v / 1e6:,.2f} MB" for k, v in sorted(snapshot.items()))
        + ")",
        "",
        "| target events/s | ranks at the measured per-rank rate | per-rank events/s needed with 64 ranks "
        "| steps/s per rank (batch) | ring allreduce bytes/s per rank at 64 ranks | min partitions |",
        "|---|---|---|---|---|---|",
    ]
    for target in targets:
        ranks = math.ceil(target / per_rank)
        need = target / 64
        steps = need / batch
        ring = 2 * 63 / 64 * (dense_bytes + table_bytes) * steps
        out.append(
            f"| {target:,.0f} | {ranks:,} | {need:,.0f} | {steps:,.1f} | {ring / 1e9:,.2f} GB/s | "
            f"{max(ranks, 64):,} at this rate; 64 (128 to re-shard) with faster ranks |"
        )
    dim = split["table_dim"]
    out += [
        "",
        f"Sparse tables at production vocabularies (rows = ids, {dim} dims fp32; Adam keeps two more copies). "
        "DDP all-reduces a table's full gradient every step: EmbeddingBag gradients are dense here.",
        "",
        "| ids | table MB | with Adam MB | allreduce per step vs the dense layers | at 64 ranks, 10^6 events/s: "
        "allreduce GB/s per rank |",
        "|---|---|---|---|---|",
    ]
    steps_at_million = 1e6 / 64 / batch
    for count in ids:
        table = 4 * dim * count
        out.append(
            f"| {count:,.0f} | {table / 1e6:,.0f} | {3 * table / 1e6:,.0f} | {table / dense_bytes:,.1f}x "
            f"| {2 * 63 / 64 * (dense_bytes + table) * steps_at_million / 1e9:,.1f} |"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ddp_plan", description=__doc__)
    parser.add_argument("--label", help="run in reports/trainer_ddp.json (default: the last one)")
    parser.add_argument("--targets", default="100000,1000000")
    parser.add_argument("--ids", default="1e6,1e7,1e8", help="vocabulary sizes for the sparse-table rows")
    args = parser.parse_args(argv)
    data = json.loads(REPORT.read_text())
    run = data[args.label] if args.label else list(data.values())[-1]
    split = parameter_split()
    targets = [float(t) for t in args.targets.split(",")]
    ids = [float(i) for i in args.ids.split(",")]
    print("\n".join(plan(run, split, targets, ids)))


if __name__ == "__main__":
    main()
