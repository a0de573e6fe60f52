"""Write a benchmark result as reports/<dataset>.json, a markdown table and PNG plots.

`python -m bench.report reports/<dataset>.json` renders the table and plots again from the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HEADLINE_K = {"gowalla": 20, "movielens": 20}


def headline_k(report: dict) -> int:
    return HEADLINE_K.get(report["dataset"], 100)


def markdown(report: dict) -> str:
    k = headline_k(report)
    has_truth = any(f"recall@{k}_vs_truth" in p for p in report["points"])
    lines = [
        f"# Benchmark: {report['dataset']}",
        "",
        f"{report['date']}, {report['machine']}; {report['num_items']:,} items, {report['num_eval_users']} eval users,"
        f" {report['steps']} training steps per model{' (quick mode)' if report['quick'] else ''};"
        f" wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
        *(f"- {key}: {value}" for key, value in report["notes"].items()),
        "",
        "## Models (held-out impressions)",
        "",
        "| model | NE | NE vs Two Tower | calibration | cluster NE (levels 1, 2) | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in report["models"].items():
        cluster = ", ".join(f"{ne:.4f}" for ne in m.get("cluster_ne", [])) or "-"
        lines.append(
            f"| {name} | {m['ne']:.4f} | {m['ne_vs_two_tower_percent']:+.2f}% | {m['calibration']:.3f} |"
            f" {cluster} | {m['train_seconds']:.0f} |"
        )
    header = f"| method | setting | items scored | share | recall@{k} | recall@{k} vs MoNN exhaustive |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: |"
    if has_truth:
        header += f" recall@{k} vs truth |"
        rule += " ---: |"
    lines += [
        "",
        "## Retrieval (per query means; latency single-query on this machine)",
        "",
        header + " p50 ms | p99 ms | batched ms/query |",
        rule + " ---: | ---: | ---: |",
    ]
    for p in report["points"]:
        row = (
            f"| {p['method']} | {p['knob']} | {p['items_scored']:.0f} | {100 * p['items_scored_share']:.2f}% |"
            f" {p[f'recall@{k}']:.4f} | {p[f'recall@{k}_vs_monn_exhaustive']:.4f} |"
        )
        if has_truth:
            row += f" {p[f'recall@{k}_vs_truth']:.4f} |"
        row += f" {p['latency_ms_p50']:.2f} | {p['latency_ms_p99']:.2f} | {p['batched_ms_per_query']:.2f} |"
        lines.append(row)
    lines += [
        "",
        "## Index health (level 1)",
        "",
        "| model | used / nodes | max/mean | entropy | gini |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, h in report["index_health"].items():
        lines.append(
            f"| {name} | {h['used_nodes']:.0f} / {h['nodes']:.0f} | {h['max_over_mean']:.2f} |"
            f" {h['entropy']:.3f} | {h['gini']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_recall_vs_cost(report: dict, path: Path) -> None:
    k = headline_k(report)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # synthetic data: the true top-K says more than a handful of sampled held-out clicks
    first = (f"recall@{k}_vs_truth", "true top-K") if f"recall@{k}_vs_truth" in report["points"][0] else None
    for axis, key, title in (
        (axes[0], *(first or (f"recall@{k}", "held-out positives"))),
        (axes[1], f"recall@{k}_vs_monn_exhaustive", "MoNN exhaustive top-K"),
    ):
        axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more methods than the default 10 colours
        by_method: dict[str, list[tuple[float, float]]] = {}
        for p in report["points"]:
            by_method.setdefault(p["method"], []).append((p["items_scored"], p[key]))
        for method, values in by_method.items():
            values.sort()
            xs, ys = zip(*values, strict=True)
            axis.plot(xs, ys, marker="o", label=method)
        axis.set_xscale("log")
        axis.set_xlabel("items scored per query (log)")
        axis.set_ylabel(key)
        axis.set_title(f"{report['dataset']}: recall@{k} vs {title}")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_node_sizes(report: dict, path: Path) -> None:
    fig, axis = plt.subplots(figsize=(7, 4))
    for name, sizes in report["node_sizes"].items():
        if name.startswith("hsnn_joint"):
            axis.plot(sorted(sizes, reverse=True), marker=".", label=name)
    axis.set_xlabel("level-1 node (sorted by size)")
    axis.set_ylabel("items")
    axis.set_title("node sizes with and without the balance aids (FLOPs regulariser + re-seeding)")
    save_figure(fig, axis, path)


def save_figure(fig, axis, path: Path) -> None:
    """Legend, light grid, tight layout, PNG at 110 dpi: the look of every benchmark plot."""
    axis.legend()
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = report["dataset"]
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}_recall_vs_cost.png"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(markdown(report))
    plot_recall_vs_cost(report, paths[2])
    if {"hsnn_joint", "hsnn_joint_no_balance"} <= set(report["node_sizes"]):
        paths.append(out / f"{name}_node_sizes.png")
        plot_node_sizes(report, paths[-1])
    return paths


if __name__ == "__main__":
    import sys

    for json_path in sys.argv[1:]:
        source = Path(json_path)
        for written in write_report(json.loads(source.read_text()), source.parent):
            print(f"wrote {written}")
