"""How much the training budget moves one model's full-ranking recall, without the whole benchmark.

`python -m bench` trains every method on one shared budget; this tool trains a single model (Two Tower
or MoNN, the bench's quick shapes) under a data set's protocol and varies only the budget knobs: steps,
rows per batch, sampled negatives per positive (log loss) and the Adam step size. It prints one JSON
line per run (and appends it to `--out`), with the positives trained on and the epochs that makes,
because on implicit-feedback data the positives seen, not the steps taken, decide recall.

    python -m bench.budget --dataset gowalla --model two_tower --steps 2000 --batch-size 1000 \\
        --negatives 0 --lr 1e-2 --eval-users 500 --out reports/training_budget.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.data import protocol_data
from bench.harness import rank_users, train_for
from bench.methods import monn_brute_force_point
from bench.metrics import ndcg_at_k, recall_at_k
from bench.run import _model_config
from clitools.allocator import reexec_under_jemalloc
from clitools.arguments import int_at_least
from hsnn.features import TrainingBatch
from hsnn.monn import MoNN


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("gowalla", "movielens"), default="gowalla")
    parser.add_argument("--protocol", help="gowalla: valid (default) | official; movielens: recbole (default)")
    parser.add_argument("--model", choices=("two_tower", "monn_small"), default="two_tower")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per batch: positives x (1 + negatives)")
    parser.add_argument("--negatives", type=int, default=4, help="uniform negatives per positive (log loss)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--retrieval-candidates",
        type=int_at_least(2),
        default=128,
        help="distinct batch items per clicked row's softmax",
    )
    parser.add_argument("--sparse-dim", type=int, default=64)
    parser.add_argument("--eval-users", type=int, help="gowalla valid: users evaluated (default 3,000)")
    parser.add_argument("--data-root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append the JSON line to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.negatives < 0 or args.batch_size < 1 + args.negatives:
        parser.error("need --steps >= 1, --negatives >= 0 and --batch-size >= 1 + --negatives")
    if not 0 < args.lr <= 1:
        parser.error(f"--lr must be in (0, 1], got {args.lr}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, protocol = protocol_data(
        args.dataset, args.protocol, None, args.eval_users, args.data_root, args.seed, args.batch_size, args.negatives
    )
    model = MoNN(_model_config(args.model, True, args.sparse_dim), data.schema)
    positives = 0

    def count_positives(batch: TrainingBatch) -> TrainingBatch:
        nonlocal positives
        positives += int(batch.labels[:, 0].sum())
        return batch

    train_seconds = train_for(
        model,
        data,
        args.steps,
        args.seed,
        args.model,
        lr=args.lr,
        transform=count_positives,
        retrieval_candidates=args.retrieval_candidates,
    )
    retrieved, _ = rank_users(monn_brute_force_point(model, data), data, 20)
    assert data.train_pairs is not None
    result = {
        "dataset": data.name,
        "protocol": protocol,
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "negatives": args.negatives,
        "lr": args.lr,
        "retrieval_candidates": args.retrieval_candidates,
        "positives_trained": positives,
        "epochs": round(positives / len(data.train_pairs[0]), 2),
        "eval_users": len(data.relevant),
        "recall@20": round(recall_at_k(retrieved, data.relevant, 20), 4),
        "ndcg@20": round(ndcg_at_k(retrieved, data.relevant, 20), 4),
        "train_seconds": round(train_seconds, 1),
        "seed": args.seed,
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as out:
            out.write(line + "\n")
    return result


if __name__ == "__main__":
    reexec_under_jemalloc()
    main()
