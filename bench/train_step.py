"""Where an online training step of the default HSNN spends its time, and how far it is from the machine's limit.

    python -m bench.train_step --batch-size 1024 --steps 8 --threads 1 --compile

The trainer bench (`bench.trainer_throughput`) times the whole loop from Kafka; this one isolates the step
(`hsnn.training.train_step`) on the same simulator impressions (histories up to 32 events) and the same
default preset, and answers three questions:

1. FLOPs per event, measured (torch.profiler's FLOP count over one step) and split by part from the cost
   accounting (`MoNN.pair_flops` x pairs scored): the level models' training pairs, the node-ranking
   softmax over siblings, the item model and its in-batch softmax;
2. the achieved GFLOP/s against the measured float32 matmul GFLOP/s at the same thread count, and the
   events/s ceiling that follows (every core at the matmul rate, no other work);
3. eager vs `torch.compile`d over-arches (`--compile`), median ms per step, the two interleaved.

Writes reports/train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.loadgen import matmul_gflops
from bench.trainer_throughput import simulator_feed
from clitools.arguments import int_at_least
from clitools.progress import progress_bar
from hsnn.features import TrainingBatch
from hsnn.model import CLICK, HSNN
from hsnn.training import make_optimizer, train_step
from streaming.tensors import impressions_to_batch

REPORT = Path(__file__).resolve().parents[1] / "reports" / "train_step"


def make_batches(batch_size: int, count: int, ads: int, users: int, seed: int) -> tuple[HSNN, list[TrainingBatch]]:
    """A fresh default-preset HSNN and `count` batches of simulator impressions, as the trainer builds them."""
    config, items, impressions = simulator_feed(batch_size * count, ads, users, 32, seed)
    catalogue = {e.ad_id: e.features for e in items if e.features is not None}
    batches = [
        impressions_to_batch(impressions[i * batch_size : (i + 1) * batch_size], config.features, catalogue)
        for i in range(count)
    ]
    return HSNN(config), batches


def flops_by_part(model: HSNN, batch: TrainingBatch) -> dict[str, float]:
    """Forward FLOPs per event of the pair scorers (interaction tower + over-arch), from the cost accounting."""
    size = len(batch)
    clicked = int((batch.labels[:, CLICK] > 0.5).sum())
    parts: dict[str, float] = {}
    for level, monn in enumerate(model.level_models):
        siblings = model.index.levels[level].codebook.shape[0]
        parts[f"level {level} ({monn.config.name}) training pairs"] = float(monn.pair_flops())
        if model.config.node_ranking_weight > 0:
            parts[f"level {level} node ranking, {siblings} siblings"] = monn.pair_flops() * clicked * siblings / size
    item = model.item_model
    parts[f"item ({item.config.name}) training pairs"] = float(item.pair_flops())
    if model.config.retrieval_weight > 0:
        candidates = min(model.config.retrieval_candidates, len(torch.unique(batch.item_keys)))
        parts[f"item in-batch softmax, {candidates} candidates"] = item.pair_flops() * clicked * candidates / size
    return parts


def profiled_flops(model: HSNN, batch: TrainingBatch, optimizer: torch.optim.Optimizer) -> float:
    """FLOPs of one whole step (forward, backward, update) as torch.profiler counts them (matmuls, convs)."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        train_step(model, batch, optimizer)
    return float(sum(event.flops for event in prof.key_averages()))


def time_steps(model: HSNN, batches: list[TrainingBatch], optimizer: torch.optim.Optimizer) -> list[float]:
    times = []
    for batch in batches:
        started = time.perf_counter()
        train_step(model, batch, optimizer)
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int_at_least(1), default=1024)
    parser.add_argument(
        "--steps", type=int_at_least(1), default=8, help="timed steps per variant (after 2 warm-up steps)"
    )
    parser.add_argument(
        "--rounds", type=int_at_least(1), default=2, help="eager/compiled alternations (interleaved timing)"
    )
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd over-arches")
    parser.add_argument("--ads", type=int_at_least(1), default=2_000)
    parser.add_argument("--users", type=int_at_least(1), default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    count = 2 + args.steps
    model, batches = make_batches(args.batch_size, count, args.ads, args.users, args.seed)
    optimizer = make_optimizer(model)
    time_steps(model, batches[:2], optimizer)  # warm-up: allocator, k-means seeding of the index
    measured = profiled_flops(model, batches[2], optimizer) / args.batch_size
    parts = flops_by_part(model, batches[2])

    variants = {"eager": model}
    if args.compile:
        from trainer.startup import compile_overarches  # here, so the tool also runs on commits without it

        compiled = HSNN(model.config)
        compiled.load_state_dict(model.state_dict())
        compile_overarches(compiled)
        started = time.perf_counter()
        time_steps(compiled, batches[:2], make_optimizer(compiled))  # compiles (dynamic shapes) and warms up
        compile_s = time.perf_counter() - started
        variants["compiled"] = compiled
    optimizers = {name: make_optimizer(m) for name, m in variants.items()}
    step_s: dict[str, list[float]] = {name: [] for name in variants}
    for _ in progress_bar(range(args.rounds), "rounds"):
        for name, m in variants.items():
            step_s[name] += time_steps(m, batches[2:], optimizers[name])
    matmul = matmul_gflops()
    median = {name: statistics.median(times) for name, times in step_s.items()}
    eager_s = median["eager"]
    cores = os.cpu_count() or 1
    result = {
        "command": "python -m bench.train_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "cores": cores,
        "batch_size": args.batch_size,
        "history": 32,
        "levels": [m.config.name for m in model.level_models],
        "item_model": model.item_model.config.name,
        "nodes_per_level": [level.codebook.shape[0] for level in model.index.levels],
        "click_rate": float(batches[2].labels[:, CLICK].mean()),
        "flops_per_event": measured,
        "forward_pair_flops_per_event": parts,
        "matmul_gflops": matmul,
        "median_step_ms": {name: 1e3 * s for name, s in median.items()},
        "us_per_event": {name: 1e6 * s / args.batch_size for name, s in median.items()},
        "achieved_gflops": {name: measured * args.batch_size / s / 1e9 for name, s in median.items()},
        "roofline_share": {name: measured * args.batch_size / s / 1e9 / matmul for name, s in median.items()},
        "ceiling_events_per_s_all_cores": matmul * 1e9 / args.threads * cores / measured,
        "compile_s": compile_s if args.compile else None,
        "speedup_compiled": eager_s / median["compiled"] if args.compile else None,
    }
    write_report(result, args.out)
    print(
        f"{measured / 1e6:,.0f} MFLOP per event; eager {result['us_per_event']['eager']:,.0f} us/event at "
        f"{result['achieved_gflops']['eager']:.1f} GFLOP/s ({100 * result['roofline_share']['eager']:.0f}% of "
        f"matmul {matmul:.1f}); ceiling {result['ceiling_events_per_s_all_cores']:,.0f} events/s on {cores} cores"
    )
    if args.compile:
        print(
            f"compiled: {result['us_per_event']['compiled']:,.0f} us/event, {result['speedup_compiled']:.2f}x "
            f"(compile + warm-up {compile_s:.0f} s)"
        )


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {ms:,.0f} | {result['us_per_event'][name]:,.0f} | {result['achieved_gflops'][name]:.1f} | "
        f"{100 * result['roofline_share'][name]:.0f}% |"
        for name, ms in result["median_step_ms"].items()
    )
    total_forward = sum(result["forward_pair_flops_per_event"].values())
    parts = "\n".join(
        f"| {part} | {flops / 1e6:,.1f} | {100 * flops / total_forward:.0f}% |"
        for part, flops in result["forward_pair_flops_per_event"].items()
    )
    compiled = (
        f"\ntorch.compile of the over-arches: {result['speedup_compiled']:.2f}x per step, after "
        f"{result['compile_s']:.0f} s of compiling and warm-up.\n"
        if result["speedup_compiled"]
        else ""
    )
    out.with_suffix(".md").write_text(
        f"""# One online training step (`python -m bench.train_step`)

Default preset HSNN (levels {", ".join(result["levels"])}, nodes {result["nodes_per_level"]}; item model
{result["item_model"]}) on simulator impressions with histories up to {result["history"]} events, batch
{result["batch_size"]}, click rate {result["click_rate"]:.3f}, {result["threads"]} torch thread(s).

**{result["flops_per_event"] / 1e6:,.0f} MFLOP per event** (forward, backward and update, profiler count).
Float32 matmul on this machine at the same threads: {result["matmul_gflops"]:.1f} GFLOP/s, so even with every
one of the {result["cores"]} cores at that rate and nothing else to do, a trainer could not pass
**{result["ceiling_events_per_s_all_cores"]:,.0f} events/s** with this model.

| variant | median ms/step | us/event | GFLOP/s | share of matmul |
|---|---:|---:|---:|---:|
{rows}
{compiled}
Forward FLOPs per event of the pair scorers (interaction tower + over-arch; cost accounting, towers excluded):

| part | MFLOP/event | share |
|---|---:|---:|
{parts}

Command: `{result["command"]}`
"""
    )


if __name__ == "__main__":
    main()
