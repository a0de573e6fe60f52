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
    """Parameter counts of the bench's model: embedding tables vs everything else (dense), and the lookups."""
    from hsnn.config import HSNNConfig
    from hsnn.model import HSNN
    from worlds.simulator import feature_schema, scaled_config

    model = HSNN(HSNNConfig(features=feature_schema(scaled_config(ads, users, seed))))
    bags = [m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    tables = sum(m.weight.numel() for m in bags)
    total = sum(p.numel() for p in model.parameters())
    return {
        "total": total,
        "tables": tables,
        "dense": total - tables,
        "table_dim": max(m.weight.shape[1] for m in bags),
        "lookups_per_row": len(bags),  # one pooled lookup per table per training row
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plan(run: dict, split: dict[str, int], targets: list[float], ids: list[float], ranks_at: int = 64) -> list[str]:
    runs = list(run["runs"].values())
    ones = [r for r in runs if r["ranks"] == 1 and r["threads_per_rank"] == 1]
    groups = [r for r in runs if r["ranks"] > 1 and not r.get("independent")]
    controls = [r for r in runs if r.get("independent")]
    world = groups[0]["ranks"]
    one = _mean([r["events_per_second"] for r in ones])
    group = _mean([r["events_per_second"] for r in groups])
    per_rank = group / world
    batch = groups[0].get("batch_per_rank", run["batch_size"])
    dense_bytes = 4 * split["dense"]
    table_bytes = 4 * split["tables"]
    allreduce = _mean([r["allreduce_seconds"] for g in groups for r in g["per_rank"] if r["allreduce_seconds"]])
    snapshot = next((r["snapshot_bytes"] for g in runs for r in g["per_rank"] if r["snapshot_bytes"]), {}) or {}
    snapshot_total = sum(snapshot.values())
    dim = split["table_dim"]
    lookups = split["lookups_per_row"]
    out = [
        f"Measured (`{run['command']}`, commit {run['commit']}, {run['cores']} cores):",
        "",
        f"- one rank, 1 thread: {one:,.1f} events/s (mean of {len(ones)}); {world} ranks x 1 thread: {group:,.1f} "
        f"events/s (mean of {len(groups)}), {per_rank:,.1f} per rank, {group / one:.2f}x one rank"
        + (
            f"; control, {controls[0]['ranks']} single trainers side by side: "
            f"{_mean([r['events_per_second'] for r in controls]):,.1f} events/s"
            if controls
            else ""
        ),
        f"- parameters: {split['total']:,} = {split['dense']:,} dense ({dense_bytes / 1e6:,.1f} MB fp32) + "
        f"{split['tables']:,} in {lookups} embedding tables ({table_bytes / 1e6:,.2f} MB, {dim} dims)",
        f"- one allreduce of those bytes, {world} ranks, gloo on loopback: {1e3 * allreduce:,.1f} ms "
        f"(one per step of {batch} rows per rank)",
        f"- snapshot: {snapshot_total / 1e6:,.1f} MB ("
        + ", ".join(f"{k} {v / 1e6:,.2f} MB" for k, v in sorted(snapshot.items()) if v > 1000)
        + ")",
        "",
        f"| target events/s | ranks at {per_rank:,.0f} events/s per rank "
        f"| per-rank events/s needed at {ranks_at} ranks "
        f"| steps/s per rank (batch {batch}) | ring allreduce per rank at {ranks_at} ranks |",
        "|---|---|---|---|---|",
    ]
    ring = 2 * (ranks_at - 1) / ranks_at
    for target in targets:
        need = target / ranks_at
        steps = need / batch
        out.append(
            f"| {target:,.0f} | {math.ceil(target / per_rank):,} | {need:,.0f} | {steps:,.1f} "
            f"| {ring * (dense_bytes + table_bytes) * steps / 1e9:,.2f} GB/s |"
        )
    record = run["record_bytes_mean"]
    ingest_us = _mean(
        [sum(r["us_per_event"][k] for k in ("poll", "items", "decode", "batch")) for g in groups for r in g["per_rank"]]
    )
    out += [
        "",
        f"Partitions and ingest: a rank owns whole partitions, so partitions >= ranks ({ranks_at} ranks: at least "
        f"{ranks_at}; {2 * ranks_at} lets the group grow to {2 * ranks_at} ranks without repartitioning, since "
        f"ownership is p % ranks). Records average {record:,.0f} B and cost {ingest_us:,.0f} us per event of "
        "poll + items + decode + batch on a rank here:",
        "",
        "| target events/s | Kafka ingest | per partition at "
        f"{2 * ranks_at} partitions | ingest CPU (cores) at the measured us/event |",
        "|---|---|---|---|",
    ]
    for target in targets:
        out.append(
            f"| {target:,.0f} | {target * record / 1e9:,.2f} GB/s | {target / (2 * ranks_at):,.0f} events/s "
            f"| {target * ingest_us / 1e6:,.0f} |"
        )
    steps_at_million = 1e6 / ranks_at / batch
    all_to_all = 2 * batch * lookups * dim * 4  # pooled embeddings out and their gradients back, per step per rank
    out += [
        "",
        f"Embedding tables at production vocabularies ({dim} dims fp32, Adam's two moments on top). DDP all-reduces "
        "a replicated table's whole gradient every step; TorchRec-style sharding instead exchanges the pooled "
        f"lookups: {lookups} per row x {batch} rows x {dim} dims, forward and backward = "
        f"{all_to_all / 1e6:,.2f} MB per step per rank, whatever the vocabulary.",
        "",
        "| ids per table | table MB | with Adam MB (replicated on every rank) | table gradient / dense layers "
        f"| DDP allreduce per rank at {ranks_at} ranks, 10^6 events/s | sharded: all-to-all per rank |",
        "|---|---|---|---|---|---|",
    ]
    for count in ids:
        table = 4 * dim * count
        out.append(
            f"| {count:,.0f} | {table / 1e6:,.0f} | {3 * table / 1e6:,.0f} | {table / dense_bytes:,.1f}x "
            f"| {ring * (dense_bytes + table) * steps_at_million / 1e9:,.1f} GB/s "
            f"| {all_to_all * steps_at_million / 1e9:,.2f} GB/s |"
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
