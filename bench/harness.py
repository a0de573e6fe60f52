"""Benchmark harness: one data interface, every method trained on the same batches, one sweep loop.

A method turns into one or more *retrievers* (a cost knob fixed: a beam width, nprobe,
efSearch, ...). Every retriever answers the same users; the harness measures recall@K against
held-out positives (and against the exhaustive MoNN's and the planted/simulated truth's top-K
where the data has them), items and nodes scored, FLOPs and latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from hsnn.metrics import calibration, normalized_entropy, recall_at_k
from hsnn.model import HSNN
from hsnn.progress import progress_bar
from hsnn.training import calibrated_click_probs, make_optimizer, train_step

K_VALUES = (10, 20, 50, 100, 200)


@dataclass
class BenchData:
    """What every data set provides to the harness."""

    name: str
    schema: FeatureSchema
    item_ids: Tensor  # (N,) sorted ascending, raw ids as the features carry them
    items: ItemBatch
    batches: Callable[[int, int], Iterator[TrainingBatch]]  # (num_batches, seed) -> training batches
    eval_users: UserBatch
    relevant: list[set[int]]  # held-out positives (item ids) per eval user
    eval_impressions: list[TrainingBatch]  # labelled held-out pairs for NE / calibration
    hierarchy: Tensor | None = None  # (N, 2) an existing item hierarchy as codes, for the "hierarchy" builder
    true_scores: Callable[[Tensor], Tensor] | None = None  # eval user rows -> (U, N) true logits (synthetic data)
    exclude: list[Tensor] | None = None  # per eval user, item ids never to return (e.g. their train items)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def rows_of(self, ids: Tensor) -> Tensor:
        return torch.searchsorted(self.item_ids, ids)

    def true_top(self, k: int) -> list[list[int]] | None:
        """Ranked true top-k item ids per eval user (synthetic data only)."""
        if self.true_scores is None:
            return None
        scores = self.true_scores(torch.arange(len(self.eval_users)))
        top = torch.topk(scores, min(k, self.num_items), dim=1).indices
        return [self.item_ids[row].tolist() for row in top]


@dataclass
class Answer:
    """One user's answer from a retriever."""

    item_ids: list[int]
    items_scored: int
    nodes_scored: int = 0
    flops: int = 0


Retriever = Callable[[UserBatch, int], list[Answer]]


@dataclass
class SweepPoint:
    method: str
    knob: str
    retriever: Retriever


def train_for(
    model: torch.nn.Module,
    data: BenchData,
    steps: int,
    seed: int,
    label: str,
    lr: float = 3e-3,
    transform: Callable[[TrainingBatch], TrainingBatch] | None = None,
) -> float:
    """Train on `steps` batches of the data set (the shared budget); returns wall seconds."""
    optimizer = make_optimizer(model, lr=lr)
    started = time.perf_counter()
    batches = data.batches(steps, seed)
    for batch in progress_bar(batches, f"train {label}", enabled=True):
        train_step(model, transform(batch) if transform else batch, optimizer)
    return time.perf_counter() - started


def split_held_out(data: BenchData) -> tuple[TrainingBatch, list[TrainingBatch]]:
    """The first held-out batch fits calibration; the rest measure NE (one batch is split in halves)."""
    if len(data.eval_impressions) > 1:
        return data.eval_impressions[0], data.eval_impressions[1:]
    batch = data.eval_impressions[0]
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(0))
    halves = [order[: len(order) // 2], order[len(order) // 2 :]]
    parts = [
        TrainingBatch(
            users=batch.users.select(rows),
            items=batch.items.select(rows),
            labels=batch.labels[rows],
            item_keys=None if batch.item_keys is None else batch.item_keys[rows],
        )
        for rows in halves
    ]
    return parts[0], parts[1:]


def quality(
    model: torch.nn.Module, data: BenchData, transform: Callable[[TrainingBatch], TrainingBatch] | None = None
) -> dict[str, float]:
    """NE and calibration of the click task on held-out impressions, every model Platt-scaled alike.

    The first held-out part fits the scaling (monotone: rankings stay), the rest measures, so no
    method gains on NE from a calibration step the others did not get.
    """
    fit, measured = split_held_out(data)
    transform = transform or (lambda batch: batch)
    measured = [transform(b) for b in measured]
    labels = torch.cat([b.labels[:, 0] for b in measured])
    probs = calibrated_click_probs(model, transform(fit), measured)
    result = {"ne": normalized_entropy(probs, labels), "calibration": calibration(probs, labels)}
    if isinstance(model, HSNN):
        result["cluster_ne"] = cluster_ne(model, measured)
    return result


@torch.no_grad()
def cluster_ne(model: HSNN, batches: list[TrainingBatch]) -> list[float]:
    """NE of each node level's calibrated click prediction (user x the item's node, top level first).

    This is how well the index's clusters alone predict clicks: the paper's cluster-level NE,
    which compares index builders without the item-level model hiding their differences.
    """
    model.eval()
    per_level: list[list[Tensor]] = [[] for _ in range(model.num_levels)]
    for batch in batches:
        logits = model(batch).logits
        for level in range(model.num_levels):
            per_level[level].append(torch.sigmoid(model.calibrate(level, logits[level]))[:, 0])
    labels = torch.cat([b.labels[:, 0] for b in batches])
    return [normalized_entropy(torch.cat(probs), labels) for probs in per_level]


def exclude_and_cut(answers: list[Answer], data: BenchData, k: int) -> list[list[int]]:
    """Each user's ids without their excluded items (e.g. train positives), cut to k."""
    if not data.exclude:
        return [a.item_ids[:k] for a in answers]
    return [
        [i for i in a.item_ids if i not in banned][:k]
        for a, banned in zip(answers, (set(e.tolist()) for e in data.exclude), strict=True)
    ]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def evaluate(
    point: SweepPoint,
    data: BenchData,
    references: dict[str, list[list[int]]],
    k_values: tuple[int, ...] = K_VALUES,
    latency_users: int = 50,
    batch_size: int = 32,
) -> dict:
    """Run one retriever over every eval user (in batches), then time single and batched queries."""
    k_max = max(k_values)
    users = data.eval_users
    ask = k_max + (max(len(e) for e in data.exclude) if data.exclude else 0)
    answers: list[Answer] = []
    batched_started = time.perf_counter()
    for start in range(0, len(users), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(users)))
        answers.extend(point.retriever(users.select(rows), ask))
    batched_seconds = time.perf_counter() - batched_started
    retrieved = exclude_and_cut(answers, data, k_max)
    single = []
    for u in range(min(latency_users, len(users))):
        started = time.perf_counter()
        point.retriever(users.select(torch.tensor([u])), ask)
        single.append(time.perf_counter() - started)
    result = {
        "method": point.method,
        "knob": point.knob,
        "items_scored": float(np.mean([a.items_scored for a in answers])),
        "items_scored_share": float(np.mean([a.items_scored for a in answers])) / data.num_items,
        "nodes_scored": float(np.mean([a.nodes_scored for a in answers])),
        "mflops_per_query": float(np.mean([a.flops for a in answers])) / 1e6,
        "latency_ms_p50": 1000 * _percentile(single, 50),
        "latency_ms_p99": 1000 * _percentile(single, 99),
        "batched_ms_per_query": 1000 * batched_seconds / len(users),
    }
    for k in k_values:
        result[f"recall@{k}"] = recall_at_k(retrieved, data.relevant, k)
        for name, ranked in references.items():
            result[f"recall@{k}_vs_{name}"] = _recall_vs_ranked(retrieved, ranked, k)
    return result


def _recall_vs_ranked(retrieved: list[list[int]], ranked_truth: list[list[int]], k: int) -> float:
    """Recall of the reference's top-k (the reference lists are ranked, best first)."""
    return recall_at_k(retrieved, [set(t[:k]) for t in ranked_truth], k)
