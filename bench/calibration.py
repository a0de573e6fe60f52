"""NE and calibration on real logged impressions (Open Bandit sample): Two Tower, MoNN and HSNN.

The OBD sample has 60,000 impressions over 160 items and only ~290 clicks, so it cannot rank
retrievers; it can check that the models' click probabilities are sane on data we did not make.
Protocol: impressions in time order; the first 70% train, the next 10% fit Platt scaling, the
last 20% measure. A per-item click-rate table is the non-neural reference. NE uses the training
click rate as its baseline (DESIGN §4), so a constant prediction of that rate scores about 1.0
and a drifting click rate shows up as NE above 1.
With ~60 clicks in the measured slice, the 95% bootstrap intervals are reported next to every
figure: differences inside them are noise.

    python -m bench --dataset open_bandit [--epochs 8] [--out reports]
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.datasets.open_bandit import CAMPAIGNS, POLICIES, OpenBanditData, impression_batch, load_open_bandit
from bench.metrics import auc, calibration
from bench.platt import platt_fit
from bench.report import plt, save_figure  # report selects the headless Agg backend
from clitools.progress import progress_bar
from hsnn.config import HSNNConfig, LTIConfig
from hsnn.metrics import normalized_entropy
from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.training import item_logits, make_optimizer, train_step
from worlds.planted import tiny_monn

SPLIT = (0.7, 0.1)  # train, calibration-fit; the rest is measured
BATCH_SIZE = 256


def time_split(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row ranges (train, calibration fit, measure) of time-ordered impressions."""
    train_end = round(size * SPLIT[0])
    fit_end = train_end + round(size * SPLIT[1])
    rows = np.arange(size)
    return rows[:train_end], rows[train_end:fit_end], rows[fit_end:]


def build_models(data: OpenBanditData, train_steps: int) -> dict[str, torch.nn.Module]:
    """Small models sized for 160 items: the same shapes as the --quick benchmark."""
    hsnn = HSNNConfig(
        features=data.schema,
        levels=[LTIConfig(num_nodes=n, schedule_steps=max(1, train_steps * 2 // 3)) for n in (16, 4)],
        level_models=[tiny_monn(f"level{i}") for i in range(2)],
        item_model=tiny_monn("item"),
        index_warmup_steps=max(1, train_steps // 10),
    )
    return {
        "two_tower": MoNN(tiny_monn("two_tower", dot_product=True, interaction=False), data.schema),
        "monn": MoNN(tiny_monn("monn"), data.schema),
        "hsnn_joint": HSNN(hsnn),
    }


def bootstrap_ne(
    probs: dict[str, Tensor], labels: Tensor, base_rate: float, reference: str, resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """95% intervals of each model's NE and of its NE change vs `reference`, resampling impressions."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in probs}
    for _ in range(resamples):
        rows = torch.from_numpy(rng.integers(0, len(labels), len(labels)))
        for name, p in probs.items():
            draws[name].append(normalized_entropy(p[rows], labels[rows], base_rate))
    ref = np.asarray(draws[reference])
    out = {}
    for name, values in draws.items():
        values = np.asarray(values)
        change = 100 * (values / ref - 1)
        out[name] = {
            "ne_ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))],
            "ne_vs_reference_ci95": [float(np.percentile(change, 2.5)), float(np.percentile(change, 97.5))],
        }
    return out


def reliability(probs: Tensor, labels: Tensor, bins: int) -> list[dict[str, float]]:
    """Mean prediction vs observed click rate in equal-count prediction bins."""
    order = torch.argsort(probs)
    return [
        {"mean_prediction": float(probs[chunk].mean()), "click_rate": float(labels[chunk].mean()), "count": len(chunk)}
        for chunk in order.tensor_split(bins)
    ]


def item_ctr_table(data: OpenBanditData, train_rows: np.ndarray, rows: np.ndarray, prior_weight: float = 20) -> Tensor:
    """A non-neural reference: each item's training click rate, shrunk towards the overall rate."""
    items = data.item_keys.numpy().ravel()
    labels = data.labels[:, 0].numpy()
    size = int(items.max()) + 1
    clicks = np.bincount(items[train_rows], weights=labels[train_rows], minlength=size)
    shown = np.bincount(items[train_rows], minlength=size)
    prior = labels[train_rows].mean()
    return torch.from_numpy((clicks + prior_weight * prior) / (shown + prior_weight)).float()[items[rows]]


def train_epochs(
    model: torch.nn.Module,
    data: OpenBanditData,
    rows: np.ndarray,
    epochs: int,
    steps_per_epoch: int,
    seed: int,
    label: str,
) -> float:
    """Shuffled passes over the training impressions (the same order for every model); wall seconds."""
    optimizer = make_optimizer(model)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    batches = (
        impression_batch(data, chunk)
        for _ in range(epochs)
        for chunk in np.array_split(rng.permutation(rows), steps_per_epoch)
    )
    for batch in progress_bar(batches, f"train {label}", total=epochs * steps_per_epoch):
        train_step(model, batch, optimizer)
    return time.perf_counter() - started


def run_calibration(
    root: str | None = None,
    epochs: int = 8,
    seed: int = 0,
    resamples: int = 1000,
    bins: int = 5,
    campaigns: tuple[str, ...] = CAMPAIGNS,
) -> dict:
    """Train each model on the same time-ordered impressions; return NE / calibration as a report dict."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = load_open_bandit(root, policies=POLICIES, campaigns=campaigns)
    train_rows, fit_rows, measure_rows = time_split(len(data))
    base_rate = data.base_ctr(train_rows)
    steps_per_epoch = -(-len(train_rows) // BATCH_SIZE)
    models = build_models(data, epochs * steps_per_epoch)
    fit_batch, measure_batch = impression_batch(data, fit_rows), impression_batch(data, measure_rows)
    labels = measure_batch.labels[:, 0]
    results: dict[str, dict] = {}
    calibrated: dict[str, Tensor] = {}
    for name, model in models.items():
        train_seconds = train_epochs(model, data, train_rows, epochs, steps_per_epoch, seed, name)
        raw = item_logits(model, measure_batch)[:, 0]
        scale, shift = platt_fit(item_logits(model, fit_batch)[:, 0], fit_batch.labels[:, 0], iterations=50)
        calibrated[name] = torch.sigmoid(raw * scale + shift)
        results[name] = {
            "auc": auc(raw, labels),
            "ne_raw": normalized_entropy(torch.sigmoid(raw), labels, base_rate),
            "calibration_raw": calibration(torch.sigmoid(raw), labels),
            "ne": normalized_entropy(calibrated[name], labels, base_rate),
            "calibration": calibration(calibrated[name], labels),
            "train_seconds": train_seconds,
            "reliability": reliability(calibrated[name], labels, bins),
        }
    calibrated["item_ctr_table"] = item_ctr_table(data, train_rows, measure_rows)
    results["item_ctr_table"] = {
        "auc": auc(calibrated["item_ctr_table"], labels),
        "ne": normalized_entropy(calibrated["item_ctr_table"], labels, base_rate),
        "calibration": calibration(calibrated["item_ctr_table"], labels),
    }
    calibrated["constant_train_ctr"] = torch.full_like(labels, base_rate)
    results["constant_train_ctr"] = {
        "ne": normalized_entropy(calibrated["constant_train_ctr"], labels, base_rate),
        "calibration": calibration(calibrated["constant_train_ctr"], labels),
    }
    for name, intervals in bootstrap_ne(calibrated, labels, base_rate, "two_tower", resamples, seed).items():
        results[name].update(intervals)
        results[name]["ne_vs_two_tower_percent"] = 100 * (results[name]["ne"] / results["two_tower"]["ne"] - 1)
    return {
        "dataset": "open_bandit",
        "campaigns": list(campaigns),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "impressions": {"train": len(train_rows), "calibration_fit": len(fit_rows), "measured": len(measure_rows)},
        "clicks": {
            "train": int(data.labels[torch.from_numpy(train_rows)].sum()),
            "measured": int(labels.sum()),
        },
        "train_click_rate": base_rate,
        "measured_click_rate": float(labels.mean()),
        "epochs": epochs,
        "steps_per_model": epochs * steps_per_epoch,
        "bootstrap_resamples": resamples,
        "models": results,
        "wall_seconds": time.perf_counter() - started,
    }


def markdown(report: dict) -> str:
    imp, clicks = report["impressions"], report["clicks"]
    lines = [
        "# Benchmark: open_bandit (NE and calibration on real impressions)",
        "",
        f"{report['date']}, {report['machine']}; {report['epochs']} epochs ({report['steps_per_model']} steps)"
        f" per model; wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
        f"- split in time order: {imp['train']:,} train ({clicks['train']} clicks), {imp['calibration_fit']:,}"
        f" Platt fit, {imp['measured']:,} measured ({clicks['measured']} clicks)",
        f"- click rate: train {100 * report['train_click_rate']:.3f}%, measured"
        f" {100 * report['measured_click_rate']:.3f}%; NE baseline = the train rate",
        f"- intervals: 95% bootstrap over measured impressions ({report['bootstrap_resamples']} resamples)",
        "",
        "| model | AUC | NE (Platt) | 95% interval | vs Two Tower | 95% interval | calibration | NE raw |"
        " calibration raw |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in report["models"].items():
        low, high = m["ne_ci95"]
        dlow, dhigh = m["ne_vs_reference_ci95"]
        raw = f"{m['ne_raw']:.4f} | {m['calibration_raw']:.3f}" if "ne_raw" in m else "- | -"
        area = f"{m['auc']:.3f}" if "auc" in m else "0.5"
        lines.append(
            f"| {name} | {area} | {m['ne']:.4f} | {low:.4f}-{high:.4f} | {m['ne_vs_two_tower_percent']:+.2f}% |"
            f" {dlow:+.2f}%..{dhigh:+.2f}% | {m['calibration']:.3f} | {raw} |"
        )
    return "\n".join(lines) + "\n"


def plot_reliability(report: dict, path: Path) -> None:
    fig, axis = plt.subplots(figsize=(6, 5))
    top = 0.0
    for name, m in report["models"].items():
        if "reliability" not in m:
            continue
        xs = [100 * b["mean_prediction"] for b in m["reliability"]]
        ys = [100 * b["click_rate"] for b in m["reliability"]]
        axis.plot(xs, ys, marker="o", label=name)
        top = max(top, *xs, *ys)
    axis.plot([0, top], [0, top], color="grey", linestyle="--", label="perfect calibration")
    axis.set_xlabel("mean predicted CTR in bin (%)")
    axis.set_ylabel("observed CTR in bin (%)")
    axis.set_title("Open Bandit: reliability on the measured slice (equal-count bins)")
    save_figure(fig, axis, path)


def write_calibration_report(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "open_bandit.json", out / "open_bandit.md", out / "open_bandit_reliability.png"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(markdown(report))
    plot_reliability(report, paths[2])
    return paths
