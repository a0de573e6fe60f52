"""CLI: `python -m bench --dataset simulator|planted|gowalla|movielens|open_bandit [--quick]` writes
reports/<dataset>.{json,md,png}.

Protocols (docs/benchmarks.md): gowalla `--protocol valid` (default: train.txt -> valid.txt, 3,000
users) or `official` (train.txt + valid.txt -> `--test-file`, every test user); movielens `--protocol
recbole` (default: RecBole's 80/10/10 per-user split, every user) or `newest20` (the earlier protocol).
"""

from __future__ import annotations

import argparse
import sys
from typing import get_args

import torch

from bench.calibration import run_calibration, write_calibration_report
from bench.data import (
    GOWALLA_PROTOCOLS,
    GOWALLA_VALID_EVAL_USERS,
    MOVIELENS_PROTOCOLS,
    gowalla_data,
    movielens_data,
    planted_data,
    simulator_data,
)
from bench.report import aggregate_seeds, write_report
from bench.run import ABLATIONS, BUILDERS, RunConfig, run_benchmark
from clitools.allocator import reexec_under_jemalloc
from hsnn.config import HSNNConfig


def add_config_switch(parser: argparse.ArgumentParser, field: str, text: str) -> None:
    """`--field` with the choices and the default of that `HSNNConfig` switch, so the two cannot drift apart."""
    switch = HSNNConfig.model_fields[field]
    parser.add_argument(
        f"--{field.replace('_', '-')}", choices=get_args(switch.annotation), default=switch.default, help=text
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    datasets = ["simulator", "planted", "gowalla", "movielens", "open_bandit"]
    parser.add_argument("--dataset", choices=datasets, required=True)
    parser.add_argument("--quick", action="store_true", help="small models and budget: minutes on 2 cores")
    parser.add_argument("--steps", type=int, help="training batches per model (default: 1500, quick: 150)")
    parser.add_argument("--items", type=int, help="simulator/planted: catalogue size (default 100,000; quick: 5,000)")
    parser.add_argument(
        "--eval-users",
        type=int,
        help="users evaluated (default: 200, quick: 100; gowalla valid: 3,000; gowalla official and movielens"
        " recbole: every user with held-out items, not settable)",
    )
    parser.add_argument(
        "--protocol",
        choices=sorted({*GOWALLA_PROTOCOLS, *MOVIELENS_PROTOCOLS}),
        help="gowalla: valid (default) | official; movielens: recbole (default) | newest20",
    )
    parser.add_argument("--test-file", help="gowalla official protocol: the official test.txt (NGCF format)")
    parser.add_argument(
        "--split-order",
        choices=("time", "random"),
        default="time",
        help="movielens recbole: order of each user's positives before the 80/10/10 split (random = RecBole's RO)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="run with seeds seed..seed+N-1 and report mean ± std per row"
    )
    parser.add_argument("--mf-epochs", type=int, help="mf_softmax baseline: training epochs (default 10)")
    parser.add_argument("--no-mf", action="store_true", help="skip the mf_softmax baseline")
    parser.add_argument("--data-root", help="real data sets: data directory (default: under ../shared/datasets)")
    parser.add_argument(
        "--builders",
        default=",".join(BUILDERS),
        help=f"HSNN index builders, from {BUILDERS} and the ablations {tuple(ABLATIONS)}",
    )
    parser.add_argument("--batch-size", type=int, default=250, help="gowalla / movielens: rows per training batch")
    parser.add_argument("--epochs", type=int, help="open_bandit: passes over the training impressions (default 8)")
    parser.add_argument(
        "--sparse-dim", type=int, help="id embedding width of user/item towers (default: 64 on gowalla/movielens)"
    )
    parser.add_argument(
        "--level-nodes",
        help="HSNN codebook size per level, coarsest first, e.g. 64,8 (default: from the corpus size, ~100 per leaf)",
    )
    add_config_switch(
        parser,
        "index_input",
        "what every HSNN index clusters: item tower outputs, or click-logit profiles over probe users",
    )
    add_config_switch(
        parser,
        "node_input",
        "what every HSNN level model reads for a node: its path's codes (code), its members' running mean "
        "item embedding (member_mean), or residual rows started there and trained by the level losses (learned)",
    )
    parser.add_argument(
        "--index-fixed-at",
        type=float,
        default=0.5,
        help="share of the training steps after which the index is fixed: the joint LTI freezes and k-means "
        "clusters there; the level models train on the fixed index for the rest",
    )
    parser.add_argument("--out", default="reports")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--flops-at-target",
        action="store_true",
        help="LTI ablation: FLOPs regulariser on the assignment at alpha_max, not the scheduled alpha",
    )
    training = parser.add_argument_group("training budget (every trained model but mf_softmax)")
    training.add_argument("--lr", type=float, default=3e-3, help="Adam step size")
    training.add_argument(
        "--negatives",
        type=int,
        default=4,
        help="gowalla / movielens: uniform negatives per training positive for the log loss (the in-batch"
        " softmax contrasts the batch's other items whatever this is)",
    )
    args = parser.parse_args(argv)
    protocol = _protocol(parser, args)
    if args.negatives < 0:
        parser.error(f"--negatives must be >= 0, got {args.negatives}")
    if not 0 < args.lr <= 1:
        parser.error(f"--lr must be in (0, 1], got {args.lr}")
    if not 0 < args.index_fixed_at < 1:
        parser.error(f"--index-fixed-at must be between 0 and 1 (a share of the steps), got {args.index_fixed_at}")
    if args.seeds > 1:
        if args.dataset == "open_bandit":
            parser.error("--seeds is for the retrieval benchmarks")
        reports = [_run_once(args, protocol, args.seed + offset) for offset in range(args.seeds)]
        seeds = list(range(args.seed, args.seed + args.seeds))
        _finish(aggregate_seeds(reports, seeds), write_report, args.out, argv)
        return
    if args.dataset == "open_bandit":  # NE / calibration only: too few items to rank retrievers
        report = run_calibration(args.data_root, epochs=args.epochs or (2 if args.quick else 8), seed=args.seed)
        _finish(report, write_calibration_report, args.out, argv)
        return
    _finish(_run_once(args, protocol, args.seed), write_report, args.out, argv)


def _protocol(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The data set's protocol: given, or its default (a gowalla --test-file implies official)."""
    allowed = {"gowalla": GOWALLA_PROTOCOLS, "movielens": MOVIELENS_PROTOCOLS}.get(args.dataset, ())
    protocol = args.protocol
    if protocol is None:
        gowalla_default = "official" if args.test_file else "valid"
        protocol = gowalla_default if args.dataset == "gowalla" else next(iter(allowed), None)
    elif protocol not in allowed:
        parser.error(f"--protocol {protocol} does not apply to {args.dataset} (choices: {allowed or 'none'})")
    if (args.dataset, protocol) in {("gowalla", "official"), ("movielens", "recbole")} and args.eval_users:
        parser.error(f"{args.dataset} --protocol {protocol} evaluates every user with held-out items (no --eval-users)")
    return protocol


def _run_once(args: argparse.Namespace, protocol: str | None, seed: int) -> dict:
    """One benchmark run with one seed (data sampling, batches and model initialisation)."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    quick = args.quick
    run = RunConfig(
        steps=args.steps or (150 if quick else 1500),
        seed=args.seed,
        quick=quick,
        builders=tuple(b for b in args.builders.split(",") if b),
        flops_at_target_temperature=args.flops_at_target,
        hsnn_exhaustive=quick,  # with preset models one exhaustive pass costs minutes per model
        mf_softmax=not args.no_mf,
        mf_epochs=args.mf_epochs,
        index_input=args.index_input,
        node_input=args.node_input,
        index_fixed_at=args.index_fixed_at,
        lr=args.lr,
        sparse_dim=args.sparse_dim or (64 if args.dataset in ("gowalla", "movielens") else None),
        level_nodes=tuple(int(n) for n in args.level_nodes.split(",")) if args.level_nodes else None,
    )
    if quick:
        run.nprobes = (1, 2, 4, 8)
        run.ef_searches = (200, 800)
    eval_users = args.eval_users or (100 if quick else 200)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = args.items or (5000 if quick else 100_000)
    if args.dataset == "simulator":
        data = simulator_data(
            items,
            num_users=max(10_000, items // 10),
            num_eval_users=eval_users,
            train_batches=run.steps,
            seed=args.seed,
        )
    elif args.dataset == "planted":
        data = planted_data(num_items=items, num_eval_users=eval_users, seed=args.seed)
    elif args.dataset == "gowalla":
        data = gowalla_data(
            args.data_root,
            args.eval_users or GOWALLA_VALID_EVAL_USERS,
            test_path=args.test_file,
            seed=args.seed,
            batch_size=args.batch_size,
            protocol=protocol,
            negatives=args.negatives,
        )
    else:
        data = movielens_data(
            args.data_root,
            None if protocol == "recbole" else eval_users,
            seed=args.seed,
            batch_size=args.batch_size,
            protocol=protocol,
            split_order=args.split_order,
            negatives=args.negatives,
        )
    return run_benchmark(data, run)


def _finish(report: dict, writer, out: str, argv: list[str] | None) -> None:
    report["command"] = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    for path in writer(report, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    reexec_under_jemalloc()
    main()
