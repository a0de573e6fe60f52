"""Reference baseline `mf_softmax`: matrix factorisation trained with in-batch sampled softmax and logQ.

The textbook retrieval baseline ML engineers know: one free embedding per user id and per item id,
scored by their dot product. Each batch of training positives (user, item) uses the other
positives' items as the negatives (in-batch sampled softmax); because popular items turn up as
in-batch negatives more often, each logit is corrected by subtracting the log of the item's
sampling probability, its frequency in the training positives (logQ correction, Yi et al.,
RecSys 2019). Evaluation is full ranking: one (users, items) matrix product per chunk of users.

`python -m bench.methods_mf --dataset gowalla` trains and evaluates the baseline alone under a
data set's protocol (the same data, users and metrics as `python -m bench`) and prints its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.harness import BenchData, SweepPoint, full_ranking_retriever
from clitools.progress import progress_bar
from hsnn.features import UserBatch


@dataclass
class MFSoftmaxConfig:
    dim: int = 64
    batch_size: int = 2048
    epochs: int = 10  # Gowalla valid: recall@20 0.207 after 10 epochs (docs/benchmarks.md)
    learning_rate: float = 0.01
    # scores are cosine / temperature when set (normalised embeddings); a plain dot product when None
    temperature: float | None = 0.1
    weight_decay: float = 0.0
    seed: int = 0


class MatrixFactorization(torch.nn.Module):
    """User and item id embeddings; the score of (u, i) is their (optionally cosine) dot product."""

    def __init__(self, num_users: int, num_items: int, dim: int, normalize: bool) -> None:
        super().__init__()
        self.users = torch.nn.Embedding(num_users, dim)
        self.items = torch.nn.Embedding(num_items, dim)
        torch.nn.init.normal_(self.users.weight, std=0.1)
        torch.nn.init.normal_(self.items.weight, std=0.1)
        self.normalize = normalize

    def user_vectors(self, rows: Tensor) -> Tensor:
        vectors = self.users(rows)  # (B, dim)
        return F.normalize(vectors, dim=1) if self.normalize else vectors

    def item_vectors(self, rows: Tensor | None = None) -> Tensor:
        vectors = self.items.weight if rows is None else self.items(rows)  # (B or N, dim)
        return F.normalize(vectors, dim=1) if self.normalize else vectors


def in_batch_softmax_loss(
    user_vectors: Tensor, item_vectors: Tensor, item_rows: Tensor, log_q: Tensor, temperature: float
) -> Tensor:
    """Cross-entropy of each positive against the batch's other items, logits corrected by -log q(item).

    user_vectors, item_vectors: (B, dim), row b is positive pair b; item_rows: (B,) catalogue rows;
    log_q: (N,) log sampling probability per catalogue row. A column holding the row's own item again
    (the same item twice in one batch) is masked: it is a positive, not a negative.
    """
    logits = user_vectors @ item_vectors.T / temperature - log_q[item_rows][None, :]  # (B, B)
    same_item = item_rows[:, None] == item_rows[None, :]
    same_item.fill_diagonal_(False)
    logits = logits.masked_fill(same_item, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(item_rows)))


def train_mf_softmax(
    train_pairs: tuple[Tensor, Tensor], num_users: int, num_items: int, config: MFSoftmaxConfig, progress: bool = True
) -> tuple[MatrixFactorization, float]:
    """Fit MF on the training positives for `config.epochs` passes; returns (model, wall seconds)."""
    users, items = train_pairs  # (P,), (P,)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = MatrixFactorization(num_users, num_items, config.dim, normalize=config.temperature is not None)
    counts = torch.bincount(items, minlength=num_items).double()
    log_q = torch.log((counts / counts.sum()).clamp(min=1e-12)).float()  # (N,)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    temperature = config.temperature or 1.0
    steps_per_epoch = math.ceil(len(users) / config.batch_size)
    started = time.perf_counter()
    model.train()
    for _ in progress_bar(range(config.epochs), "train mf_softmax (epochs)", enabled=progress):
        order = torch.randperm(len(users), generator=generator)
        for step in range(steps_per_epoch):
            picked = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss = in_batch_softmax_loss(
                model.user_vectors(users[picked]), model.item_vectors(items[picked]), items[picked], log_q, temperature
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model, time.perf_counter() - started


def mf_softmax_point(model: MatrixFactorization, data: BenchData) -> SweepPoint:
    """Full ranking: every catalogue item scored by one matrix product per chunk of users."""
    with torch.no_grad():
        item_matrix = model.item_vectors().detach()  # (N, dim); catalogue row r = item id data.item_ids[r]

    @torch.no_grad()
    def score_all(users: UserBatch) -> Tensor:
        rows = users.sparse["user_id"][:, 0] - 1  # user id feature = row + 1
        return model.user_vectors(rows) @ item_matrix.T  # (U, N)

    flops = 2 * item_matrix.shape[1] * data.num_items
    return SweepPoint(
        "mf_softmax",
        "all items",
        full_ranking_retriever(score_all, data, flops),
        score_all=score_all,
        flops_per_query=flops,
    )


def mf_softmax(data: BenchData, config: MFSoftmaxConfig | None = None) -> tuple[SweepPoint, float]:
    """Train the baseline on the data set's training positives; returns its sweep point and train seconds."""
    if data.train_pairs is None:
        raise ValueError(f"{data.name} has no (user, item) training positives for mf_softmax")
    config = config or MFSoftmaxConfig()
    model, seconds = train_mf_softmax(data.train_pairs, data.num_users, data.num_items, config)
    return mf_softmax_point(model, data), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.methods_mf", description="the mf_softmax baseline alone")
    parser.add_argument("--dataset", choices=("gowalla", "movielens"), default="gowalla")
    parser.add_argument("--protocol", help="gowalla: valid | official; movielens: recbole | newest20")
    parser.add_argument("--test-file", help="gowalla official: the official test.txt")
    parser.add_argument("--eval-users", type=int, help="gowalla valid / movielens newest20: users evaluated")
    parser.add_argument("--data-root")
    parser.add_argument("--epochs", type=int, default=MFSoftmaxConfig().epochs)
    parser.add_argument(
        "--temperature", type=float, default=MFSoftmaxConfig().temperature, help="cosine / T; 0: plain dot product"
    )
    parser.add_argument("--learning-rate", type=float, default=MFSoftmaxConfig().learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from bench.data import protocol_data
    from bench.harness import evaluate

    torch.set_num_threads(args.threads)
    data, protocol = protocol_data(
        args.dataset, args.protocol, args.test_file, args.eval_users, args.data_root, args.seed
    )
    config = MFSoftmaxConfig(
        epochs=args.epochs, temperature=args.temperature or None, learning_rate=args.learning_rate, seed=args.seed
    )
    point, seconds = mf_softmax(data, config)
    started = time.perf_counter()
    result = evaluate(point, data, {}, k_values=(10, 20), latency_users=10)
    figures = {key: round(result[key], 4) for key in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")}
    print(
        json.dumps(
            {
                "dataset": data.name,
                "protocol": protocol,
                "eval_users": len(data.relevant),
                **figures,
                "train_seconds": round(seconds, 1),
                "eval_seconds": round(time.perf_counter() - started, 1),
                "threads": torch.get_num_threads(),
                "config": asdict(config),
            }
        )
    )


if __name__ == "__main__":
    main()
