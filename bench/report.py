"""Write a benchmark result as reports/<dataset>.json, a markdown table and PNG plots.

`python -m bench.report reports/<dataset>.json` renders the table and plots again from the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

HEADLINE_K = {"gowalla": 20, "movielens": 20}
# the cut-offs each data set's protocol reports in the table (the first one is plotted)
TABLE_KS = {"gowalla": (20,), "movielens": (20, 10)}


def _base_name(report: dict) -> str:
    return report["dataset"].split("_")[0]  # gowalla_official, movielens_newest20 share their set's K


def headline_k(report: dict) -> int:
    return HEADLINE_K.get(_base_name(report), 100)


def table_ks(report: dict) -> tuple[int, ...]:
    return TABLE_KS.get(_base_name(report), (headline_k(report),))


def value(entry: dict, key: str, spec: str = ".4f", scale: float = 1.0) -> str:
    """One figure, as `mean ± std` when the report aggregates several seeds (`<key>_std` present)."""
    text = format(scale * entry[key], spec)
    if f"{key}_std" in entry:
        text += " ± " + format(scale * entry[f"{key}_std"], spec)
    return text


def _level_list(health: dict | list) -> list[dict]:
    return health if isinstance(health, list) else [health]  # reports before per-level health held level 1


def markdown(report: dict) -> str:
    k = headline_k(report)
    has_truth = any(f"recall@{k}_vs_truth" in p for p in report["points"])
    has_ndcg = any(f"ndcg@{k}" in p for p in report["points"])
    seeds = report.get("seeds")
    lines = [
        f"# Benchmark: {report['dataset']}",
        "",
        f"{report['date']}, {report['machine']}; {report['num_items']:,} items, {report['num_eval_users']} eval users,"
        f" {report['steps']} training steps per model{' (quick mode)' if report['quick'] else ''};"
        f" wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
        *([f"- seeds: {seeds} (each figure is mean ± standard deviation over the seeds)"] if seeds else []),
        *(f"- {key}: {note}" for key, note in report["notes"].items()),
        "",
        "## Models (held-out impressions)",
        "",
        "| model | NE | NE vs Two Tower | calibration | cluster NE (levels 1, 2) | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in report["models"].items():
        cluster = ", ".join(f"{ne:.4f}" for ne in m.get("cluster_ne", [])) or "-"
        lines.append(
            f"| {name} | {value(m, 'ne')} | {value(m, 'ne_vs_two_tower_percent', '+.2f')}% |"
            f" {value(m, 'calibration', '.3f')} | {cluster} | {value(m, 'train_seconds', '.0f')} |"
        )
    for name, b in report.get("baselines", {}).items():
        lines.append(f"| {name} | - | - | - | - | {value(b, 'train_seconds', '.0f')} |")
    header = "| method | setting | items scored | share |"
    rule = "| --- | --- | ---: | ---: |"
    for cut in table_ks(report):
        header += f" recall@{cut} |" + (f" NDCG@{cut} |" if has_ndcg else "")
        rule += " ---: |" * (2 if has_ndcg else 1)
    header += f" recall@{k} vs MoNN exhaustive |"
    rule += " ---: |"
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
        row = f"| {p['method']} | {p['knob']} | {p['items_scored']:.0f} | {100 * p['items_scored_share']:.2f}% |"
        for cut in table_ks(report):
            row += f" {value(p, f'recall@{cut}')} |" + (f" {value(p, f'ndcg@{cut}')} |" if has_ndcg else "")
        row += f" {value(p, f'recall@{k}_vs_monn_exhaustive')} |"
        if has_truth:
            row += f" {value(p, f'recall@{k}_vs_truth')} |"
        row += f" {p['latency_ms_p50']:.2f} | {p['latency_ms_p99']:.2f} | {p['batched_ms_per_query']:.2f} |"
        lines.append(row)
    lines += [
        "",
        "## Index health (every level; a level-l node is a path prefix, so nodes = product of codebook sizes)",
        "",
        "| model | level | used / nodes | max/mean | entropy | gini |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, health in report["index_health"].items():
        for level, h in enumerate(_level_list(health), start=1):
            lines.append(
                f"| {name} | {level} | {value(h, 'used_nodes', '.0f')} / {h['nodes']:.0f} |"
                f" {value(h, 'max_over_mean', '.2f')} | {value(h, 'entropy', '.3f')} | {value(h, 'gini', '.3f')} |"
            )
    if report.get("oracle_cost"):
        lines += [
            "",
            "## Oracle cost (index quality apart from the scorers)",
            "",
            "Fewest items an ideal leaf-picker must score to cover half of a user's true top-100, from the"
            " built index's leaves (exact minimum per user).",
            "",
            "| model | mean items | median items | mean share of corpus |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, cost in report["oracle_cost"].items():
            lines.append(
                f"| {name} | {value(cost, 'mean', '.0f')} | {value(cost, 'median', '.0f')} |"
                f" {value(cost, 'mean_share', '.2f', 100)}% |"
            )
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _aggregate_entries(entries: list[dict]) -> dict:
    """Mean of every numeric field and `<field>_std` beside it; other fields from the first entry."""
    merged = dict(entries[0])
    for key, first in entries[0].items():
        if isinstance(first, bool) or not isinstance(first, int | float):
            continue
        mean, std = _mean_std([e[key] for e in entries])
        merged[key], merged[f"{key}_std"] = mean, std
    return merged


def _matched_points(reports: list[dict]) -> list[list[dict]]:
    """The seeds' rows grouped: by (method, setting) when every seed has that setting, else by (method,
    position among the method's settings) when every seed has as many settings (beams follow each seed's
    index shape, e.g. a given hierarchy's sizes). A row some seed lacks is left out, not guessed."""
    keyed = [{(p["method"], p["knob"]): p for p in r["points"]} for r in reports]
    per_method = [{} for _ in reports]
    for rows, report in zip(per_method, reports, strict=True):
        for point in report["points"]:
            rows.setdefault(point["method"], []).append(point)
    groups = []
    for point in reports[0]["points"]:
        key = (point["method"], point["knob"])
        if all(key in rows for rows in keyed):
            groups.append([rows[key] for rows in keyed])
            continue
        position = per_method[0][point["method"]].index(point)
        if all(len(rows.get(point["method"], [])) == len(per_method[0][point["method"]]) for rows in per_method):
            groups.append([rows[point["method"]][position] for rows in per_method])
    return groups


def _knob_label(group: list[dict]) -> str:
    knobs = list(dict.fromkeys(p["knob"] for p in group))
    return knobs[0] if len(knobs) == 1 else " / ".join(knobs) + " (per seed)"


def aggregate_seeds(reports: list[dict], seeds: list[int]) -> dict:
    """One report from runs that differ only in the seed: each row keyed by (method, setting), each
    model, health level and oracle cost holds the mean over seeds and its sample standard deviation."""
    first = reports[0]
    points = [_aggregate_entries(group) | {"knob": _knob_label(group)} for group in _matched_points(reports)]
    models = {name: _aggregate_entries([r["models"][name] for r in reports]) for name in first["models"]}
    health = {
        name: [
            _aggregate_entries([_level_list(r["index_health"][name])[level] for r in reports])
            for level in range(len(_level_list(levels)))
        ]
        for name, levels in first["index_health"].items()
    }
    section = {
        part: {name: _aggregate_entries([r[part][name] for r in reports]) for name in first.get(part, {})}
        for part in ("oracle_cost", "baselines")
    }
    return {
        **first,
        "seeds": seeds,
        "models": models,
        "points": points,
        "index_health": health,
        **section,
        "wall_seconds": sum(r["wall_seconds"] for r in reports),
    }


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
