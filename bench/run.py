"""Run every method on one data set with one budget and collect the sweep results."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

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
from bench.sizing import beams_for_budget, index_shape
from hsnn.config import HSNNConfig, LTIConfig, MoNNConfig, preset
from hsnn.monn import MoNN
from worlds.planted import tiny_monn

# joint: the LTI with every default aid (the index freezes, capped, for the second half of the steps);
# joint_plain: the first LTI (soft only, FLOPs regulariser and dead-code re-seeding, random codebook trained by
# gradient alone, index gradients into the item tower, no ranking losses at the node levels, never frozen);
# ABLATIONS: the default LTI with one aid switched off each (run them with --builders).
BUILDERS = ("joint", "joint_plain", "kmeans", "em", "hierarchy")
ABLATIONS: dict[str, tuple[dict, dict]] = {  # name -> (LTIConfig updates, HSNNConfig updates)
    "joint_plain": (
        {
            "use_balance_prices": False,
            "use_kmeans_init": False,
            "use_hard_assignment": False,
            "use_flops_regularizer": True,
            "use_dead_code_reseed": True,
            "use_ema_codebook": False,
        },
        {"index_stop_gradient": False, "node_ranking_weight": 0.0, "index_freeze_step": None},
    ),
    "joint_training_prices": ({"use_balance_prices": True}, {}),
    "joint_codes_by_members": ({"node_losses_move_codes": False}, {}),
    "joint_no_ema": ({"use_ema_codebook": False}, {}),
    "joint_no_freeze": ({}, {"index_freeze_step": None}),
    "joint_freeze_late": ({}, {"index_freeze_step": -4}),  # -n: freeze n-th of the steps before the end
    "joint_no_kmeans_init": ({"use_kmeans_init": False}, {}),
    "joint_no_hardening": ({"use_hard_assignment": False}, {}),
    "joint_no_stop_gradient": ({}, {"index_stop_gradient": False}),
    "joint_no_node_ranking": ({}, {"node_ranking_weight": 0.0}),
    "joint_flops_target": ({"use_flops_regularizer": True, "flops_at_target_temperature": True}, {}),
}


@dataclass
class RunConfig:
    steps: int = 1500
    seed: int = 0
    quick: bool = False
    level_nodes: tuple[int, ...] | None = None  # None: from the corpus size (hsnn.lti.index_shape)
    item_budgets: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)  # shares of the corpus scored per query
    sparse_dim: int | None = None  # id embedding width of the user and item towers (None: the preset's)
    beams: list[list[int]] | None = None  # explicit beams instead of the budgets
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
    index_input: str = "item_embedding"  # what every HSNN index clusters (HSNNConfig.index_input)
    node_input: str = "code"  # what every HSNN level model reads for a node (HSNNConfig.node_input)
    # share of the steps after which the index is fixed: the joint LTI freezes, k-means clusters (same point)
    index_fixed_at: float = 0.5
    lr: float = 3e-3  # Adam step size of every trained model (mf_softmax keeps its own)


def _model_config(name: str, quick: bool, sparse_dim: int | None = None) -> MoNNConfig:
    """A preset (tiny in quick mode); `sparse_dim` widens the user and item id embeddings (ID-only data
    sets need about 64 dims: everything the model knows about an item is its id's embedding)."""
    two_tower = name == "two_tower"
    config = tiny_monn(name, dot_product=two_tower, interaction=not two_tower) if quick else preset(name)
    if sparse_dim is not None:
        config.user.sparse_dim = sparse_dim
        config.item.sparse_dim = sparse_dim
    return config


def level_sizes(data: BenchData, run: RunConfig, builder: str) -> list[int]:
    if builder == "hierarchy" and data.hierarchy is not None:
        return [int(data.hierarchy[:, level].max()) + 1 for level in range(data.hierarchy.shape[1])]
    return list(run.level_nodes) if run.level_nodes else index_shape(data.num_items)


def beam_settings(data: BenchData, run: RunConfig, sizes: list[int]) -> list[list[int]]:
    """Explicit beams, or one beam setting per items-scored budget (duplicates dropped)."""
    if run.beams:
        return run.beams
    settings: list[list[int]] = []
    for share in run.item_budgets:
        beam = beams_for_budget(sizes, data.num_items, max(1, round(share * data.num_items)))
        if beam not in settings:
            settings.append(beam)
    return settings


def _freeze_fraction(updates: dict, steps: int) -> dict:
    """An ablation's negative freeze step -n means "with steps / n left"."""
    step = updates.get("index_freeze_step")
    return {"index_freeze_step": max(1, steps - steps // -step)} if step is not None and step < 0 else {}


def fixed_step(run: RunConfig) -> int:
    """The step from which every builder's index is fixed (joint: frozen; k-means: clustered)."""
    return max(1, round(run.steps * run.index_fixed_at))


def hsnn_config(data: BenchData, run: RunConfig, builder: str) -> HSNNConfig:
    sizes = level_sizes(data, run, builder)
    lti_updates, hsnn_updates = ABLATIONS.get(builder, ({}, {}))
    # the index warms up over the first quarter (k-means seeding half-way through it) and is hard for the last half
    lti_updates = {
        "schedule_steps": max(1, fixed_step(run)),
        "flops_at_target_temperature": run.flops_at_target_temperature,
        **lti_updates,
    }
    levels = [LTIConfig(num_nodes=n, **lti_updates) for n in sizes]
    level_models = [
        _model_config(run.level_models[min(i, len(run.level_models) - 1)], run.quick, run.sparse_dim)
        for i in range(len(sizes))
    ]
    return HSNNConfig(
        features=data.schema,
        levels=levels,
        level_models=level_models,
        item_model=_model_config(run.item_model, run.quick, run.sparse_dim),
        # a given hierarchy's node codes are set from the catalogue before training, so they read item embeddings
        index_input="item_embedding" if builder == "hierarchy" else run.index_input,
        node_input=run.node_input,
        **{"index_warmup_steps": max(2, min(run.steps // 4, fixed_step(run))), "index_freeze_step": fixed_step(run)}
        | hsnn_updates
        | _freeze_fraction(hsnn_updates, run.steps),
    )


def run_benchmark(data: BenchData, run: RunConfig) -> dict:
    """Train every model on the same budget, sweep every retriever, return the report as a dict."""
    torch.manual_seed(run.seed)
    started = time.perf_counter()
    models: dict[str, dict] = {}
    points = []

    two_tower = MoNN(_model_config("two_tower", run.quick, run.sparse_dim), data.schema)
    seconds = train_for(two_tower, data, run.steps, run.seed, "two tower", lr=run.lr)
    models["two_tower"] = {**quality(two_tower, data), "train_seconds": seconds}
    points += two_tower_points(two_tower, data, run.nprobes, run.ef_searches)

    points += deep_retrieval_points(data, run.steps, run.seed, run.dr_beams, two_tower, run.quick)

    monn = MoNN(_model_config(run.item_model, run.quick, run.sparse_dim), data.schema)
    seconds = train_for(monn, data, run.steps, run.seed, "monn", lr=run.lr)
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
        config = hsnn_config(data, run, builder)
        model, paths, seconds = build_hsnn(
            "joint" if builder.startswith("joint") else builder,
            config,
            data,
            run.steps,
            run.seed,
            fixed_step(run),
            lr=run.lr,
        )
        # a fixed-path model is evaluated on its own paths, as it was trained and as it serves
        transform = with_paths(data, paths) if paths is not None else (lambda batch: batch)
        name = f"hsnn_{builder}"
        models[name] = {**quality(model, data, transform), "train_seconds": seconds}
        beams = beam_settings(data, run, [level.num_nodes for level in config.levels])
        sweep, exhaustive, index = hsnn_points(name, model, data, beams, paths)
        points += [*sweep, exhaustive] if run.hsnn_exhaustive else sweep
        health[name] = level_health(index)
        if truth is not None:
            oracle[name] = oracle_cost(index, torch.stack([data.rows_of(torch.tensor(t[:100])) for t in truth]))
        node_sizes[name] = torch.bincount(index.item_nodes[:, 0], minlength=index.codebook_sizes[0]).tolist()

    # the exhaustive MoNN is ranked once: its lists are both a reference and its own row
    ranking_started = time.perf_counter()  # not `started`: that one times the whole run for the report
    brute_ranked = (*rank_users(brute, data, 200), time.perf_counter() - ranking_started)
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
        "index_input": run.index_input,
        "node_input": run.node_input,
        "notes": data.notes,
        "models": models,
        "index_health": health,
        "oracle_cost": oracle,
        "baselines": baselines,
        "node_sizes": node_sizes,
        "points": results,
        "wall_seconds": time.perf_counter() - started,
    }
