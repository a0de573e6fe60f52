"""Scaling: serving cost, latency and recall of HSNN vs Two Tower as the simulated corpus grows.

`python -m bench.scaling --ads 10000 100000 1000000` trains a small HSNN (joint LTI) and a Two
Tower model per corpus size on the same simulated impressions, then measures items scored, FLOPs,
single-query and batched latency, and recall@100 against the simulator's true top-100. The index
grows with the corpus (codebook sizes ~ N^(1/2) and N^(1/4)), the beams stay fixed, so the items
scored per query grow sub-linearly. Writes reports/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from bench.data import simulator_data
from bench.harness import evaluate, train_for
from bench.methods import build_hsnn, hsnn_points, two_tower_points
from bench.run import RunConfig, _model_config, hsnn_config
from hsnn.monn import MoNN


def level_sizes(num_ads: int) -> tuple[int, int]:
    top = max(16, round(num_ads**0.5 / 4))
    return top, max(8, round(num_ads**0.25))


def measure(num_ads: int, steps: int, eval_users: int, beams: list[int], seed: int) -> list[dict]:
    data = simulator_data(num_ads, num_users=20_000, num_eval_users=eval_users, train_batches=steps, seed=seed)
    run = RunConfig(steps=steps, seed=seed, quick=True, level_nodes=level_sizes(num_ads))
    truth = {"truth": data.true_top(200)}
    rows = []
    two_tower = MoNN(_model_config("two_tower", True), data.schema)
    train_for(two_tower, data, steps, seed, f"two tower @ {num_ads:,}")
    exact = two_tower_points(two_tower, data, nprobes=(), ef_searches=())[0]
    rows.append(evaluate(exact, data, truth, latency_users=30))
    model, paths, _ = build_hsnn("joint", hsnn_config(data, run, "joint"), data, steps, seed)
    sweep, _, _ = hsnn_points("hsnn_joint", model, data, [beams], paths)
    rows.append(evaluate(sweep[0], data, truth, latency_users=30))
    for row in rows:
        row["num_ads"] = data.num_items
        row["level_nodes"] = list(run.level_nodes)
    return rows


def write(rows: list[dict], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "command": command,
        "rows": rows,
    }
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Scaling on the simulator",
        "",
        f"{report['date']}, {report['machine']}. Command: `{command}`",
        "",
        "| ads | method | setting | items scored | share | MFLOPs/query | p50 ms | p99 ms | batched ms/query |"
        " recall@100 vs truth |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_ads']:,} | {r['method']} | {r['knob']} | {r['items_scored']:.0f} |"
            f" {100 * r['items_scored_share']:.2f}% | {r['mflops_per_query']:.1f} | {r['latency_ms_p50']:.1f} |"
            f" {r['latency_ms_p99']:.1f} | {r['batched_ms_per_query']:.1f} | {r['recall@100_vs_truth']:.4f} |"
        )
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["num_ads"])
        xs = [r["num_ads"] for r in mine]
        axes[0].plot(xs, [r["latency_ms_p50"] for r in mine], marker="o", label=f"{method} p50")
        axes[0].plot(xs, [r["latency_ms_p99"] for r in mine], marker="x", linestyle="--", label=f"{method} p99")
        axes[1].plot(xs, [r["items_scored"] for r in mine], marker="o", label=method)
    for axis, label in ((axes[0], "single-query latency (ms)"), (axes[1], "items scored per query")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("live ads (log)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("HSNN layer-wise serving vs Two Tower exact search as the corpus grows")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--ads", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-users", type=int, default=50)
    parser.add_argument("--beams", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default="reports")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for num_ads in args.ads:
        rows += measure(num_ads, args.steps, args.eval_users, args.beams, args.seed)
        write(rows, Path(args.out), "python -m bench.scaling " + " ".join(sys.argv[1:] if argv is None else argv))
    print((Path(args.out) / "scaling.md").read_text())


if __name__ == "__main__":
    main()
