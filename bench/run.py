"""Run every method on one data set with one budget and collect the sweep results."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field

import torch

from bench.harness import BenchData, evaluate, quality, rank_users, train_for
from bench.index_quality import level_health, oracle_cost
from bench.methods import (
    build_hsnn,
    deep_retrieval_points,
    hsnn_points,
    monn_brute_force_point,
    two_tower_points,
    with_paths,
)
from bench.methods_mf import MFSoftmaxConfig, mf_softmax
from hsnn.config import HSNNConfig, LTIConfig, MoNNConfig, preset
from hsnn.monn import MoNN
from hsnn.planted import tiny_monn

# joint_no_balance: LTI without the balance aids; joint_flops_target: the FLOPs regulariser applied to the
# assignment at alpha_max (an LTI switch, off by default in LTIConfig)
BUILDERS = ("joint", "joint_no_balance", "joint_flops_target", "kmeans", "em", "hierarchy")


@dataclass
class RunConfig:
    steps: int = 1500
    seed: int = 0
    quick: bool = False
    level_nodes: tuple[int, ...] = (32, 16)
    beams: list[list[int]] = field(default_factory=lambda: [[2, 4], [4, 8], [8, 16], [16, 48]])
    nprobes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    ef_searches: tuple[int, ...] = (200, 400, 800, 1600)  # >= the 200 results asked for
    dr_beams: tuple[int, ...] = (8, 32, 128)
    builders: tuple[str, ...] = BUILDERS
    item_model: str = "monn_small"
    level_models: tuple[str, ...] = ("monn_medium", "monn_small")
    flops_at_target_temperature: bool = False
    # each HSNN model also scoring every item (how much the beams lose); costly with preset models
    hsnn_exhaustive: bool = True
    # the mf_softmax reference baseline, on data sets with (user, item) training positives
    mf_softmax: bool = True
    mf_epochs: int | None = None  # None: MFSoftmaxConfig's default


def _model_config(name: str, quick: bool) -> MoNNConfig:
    if quick:
        return tiny_monn(name, dot_product=name == "two_tower", interaction=name != "two_tower")
    return preset(name)


def hsnn_config(data: BenchData, run: RunConfig, builder: str) -> HSNNConfig:
    sizes = list(run.level_nodes)
    if builder == "hierarchy" and data.hierarchy is not None:
        sizes = [int(data.hierarchy[:, level].max()) + 1 for level in range(data.hierarchy.shape[1])]
    balance = builder != "joint_no_balance"
    schedule = max(1, run.steps * 2 // 3)
    levels = [
        LTIConfig(
            num_nodes=n,
            schedule_steps=schedule,
            use_flops_regularizer=balance,
            use_dead_code_reseed=balance,
            flops_at_target_temperature=run.flops_at_target_temperature or builder == "joint_flops_target",
        )
        for n in sizes
    ]
    level_models = [
        _model_config(run.level_models[min(i, len(run.level_models) - 1)], run.quick) for i in range(len(sizes))
    ]
    return HSNNConfig(
        features=data.schema,
        levels=levels,
        level_models=level_models,
        item_model=_model_config(run.item_model, run.quick),
        index_warmup_steps=max(1, run.steps // 10),
    )


def run_benchmark(data: BenchData, run: RunConfig) -> dict:
    """Train every model on the same budget, sweep every retriever, return the report as a dict."""
    torch.manual_seed(run.seed)
    started = time.perf_counter()
    models: dict[str, dict] = {}
    points = []

    two_tower = MoNN(_model_config("two_tower", run.quick), data.schema)
    seconds = train_for(two_tower, data, run.steps, run.seed, "two tower")
    models["two_tower"] = {**quality(two_tower, data), "train_seconds": seconds}
    points += two_tower_points(two_tower, data, run.nprobes, run.ef_searches)

    points += deep_retrieval_points(data, run.steps, run.seed, run.dr_beams, two_tower, run.quick)

    monn = MoNN(_model_config(run.item_model, run.quick), data.schema)
    seconds = train_for(monn, data, run.steps, run.seed, "monn")
    models["monn"] = {**quality(monn, data), "train_seconds": seconds}
    brute = monn_brute_force_point(monn, data)
    points.append(brute)

    baselines: dict[str, dict] = {}
    if run.mf_softmax and data.train_pairs is not None:
        mf_config = MFSoftmaxConfig(seed=run.seed)
        if run.mf_epochs is not None:
            mf_config.epochs = run.mf_epochs
        mf_point, seconds = mf_softmax(data, mf_config)
        points.append(mf_point)
        baselines["mf_softmax"] = {"train_seconds": seconds, **vars(mf_config)}

    # the true top-K (synthetic data) serves as a reference and for each index's oracle cost
    truth = data.true_top(200)
    health: dict[str, list[dict]] = {}
    oracle: dict[str, dict] = {}
    node_sizes: dict[str, list[int]] = {}
    for builder in run.builders:
        if builder == "hierarchy" and data.hierarchy is None:
            continue
        model, paths, seconds = build_hsnn(
            "joint" if builder.startswith("joint") else builder,
            hsnn_config(data, run, builder),
            data,
            run.steps,
            run.seed,
        )
        # a fixed-path model is evaluated on its own paths, as it was trained and as it serves
        transform = with_paths(data, paths) if paths is not None else (lambda batch: batch)
        name = f"hsnn_{builder}"
        models[name] = {**quality(model, data, transform), "train_seconds": seconds}
        sweep, exhaustive, index = hsnn_points(name, model, data, run.beams, paths)
        points += [*sweep, exhaustive] if run.hsnn_exhaustive else sweep
        health[name] = level_health(index)
        if truth is not None:
            oracle[name] = oracle_cost(index, torch.stack([data.rows_of(torch.tensor(t[:100])) for t in truth]))
        node_sizes[name] = torch.bincount(index.item_nodes[:, 0], minlength=index.codebook_sizes[0]).tolist()

    # the exhaustive MoNN is ranked once: its lists are both a reference and its own row
    started = time.perf_counter()
    brute_ranked = (*rank_users(brute, data, 200), time.perf_counter() - started)
    references = {"monn_exhaustive": brute_ranked[0]}
    if truth is not None:
        references["truth"] = truth
    results = []
    for point in points:
        print(f"  evaluating {point.method} {point.knob}", flush=True)
        results.append(evaluate(point, data, references, ranked=brute_ranked if point is brute else None))
    base_ne = models["two_tower"]["ne"]
    for entry in models.values():
        entry["ne_vs_two_tower_percent"] = 100 * (entry["ne"] / base_ne - 1)
    return {
        "dataset": data.name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "num_items": data.num_items,
        "num_eval_users": len(data.eval_users),
        "steps": run.steps,
        "quick": run.quick,
        "notes": data.notes,
        "models": models,
        "index_health": health,
        "oracle_cost": oracle,
        "baselines": baselines,
        "node_sizes": node_sizes,
        "points": results,
        "wall_seconds": time.perf_counter() - started,
    }
