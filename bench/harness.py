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

from bench.metrics import calibration, ndcg_at_k, recall_at_k
from bench.platt import calibrated_click_probs
from clitools.progress import progress_bar
from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from hsnn.metrics import normalized_entropy
from hsnn.model import HSNN
from hsnn.training import make_optimizer, train_step

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
    # implicit-feedback sets: the training positives as (user row, item row) pairs, for id-based baselines
    train_pairs: tuple[Tensor, Tensor] | None = None  # ((P,), (P,)) user rows, catalogue rows
    num_users: int = 0  # user rows are 0..num_users-1; eval users carry sparse user_id = row + 1

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


ItemScorer = Callable[[UserBatch], Tensor]  # users -> (U, N) scores over every catalogue row


@dataclass
class SweepPoint:
    method: str
    knob: str
    retriever: Retriever
    # a method that scores the whole catalogue in one matrix product sets this: the harness then ranks
    # in user chunks with the excluded items masked, instead of asking the retriever for extra items
    score_all: ItemScorer | None = None
    flops_per_query: int = 0  # with score_all


def full_ranking_retriever(score_all: ItemScorer, data: BenchData, flops_per_query: int = 0) -> Retriever:
    """The Retriever view of a whole-catalogue scorer (top-k by score, nothing masked)."""

    def run(users: UserBatch, k: int) -> list[Answer]:
        scores = score_all(users)  # (U, N)
        top = torch.topk(scores, min(k, data.num_items), dim=1).indices
        return [Answer(data.item_ids[row].tolist(), data.num_items, 0, flops_per_query) for row in top]

    return run


def train_for(
    model: torch.nn.Module,
    data: BenchData,
    steps: int,
    seed: int,
    label: str,
    lr: float = 3e-3,
    transform: Callable[[TrainingBatch], TrainingBatch] | None = None,
    retrieval_candidates: int = 128,
) -> float:
    """Train on `steps` batches of the data set (the shared budget); returns wall seconds."""
    optimizer = make_optimizer(model, lr=lr)
    started = time.perf_counter()
    batches = data.batches(steps, seed)
    for batch in progress_bar(batches, f"train {label}", enabled=True):
        train_step(model, transform(batch) if transform else batch, optimizer, retrieval_candidates)
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


def rank_users(
    point: SweepPoint, data: BenchData, k: int, chunk_users: int = 256, progress: bool = True
) -> tuple[list[list[int]], list[Answer]]:
    """Every eval user's top-k item ids (excluded items removed) and the retriever's answers.

    Users go in chunks with a progress bar. A point with `score_all` is ranked as one (chunk, N)
    score matrix with each user's excluded items set to -inf; any other retriever is asked for k plus
    the chunk's largest exclusion list, and the excluded ids are dropped from its answer.
    """
    users = data.eval_users
    retrieved: list[list[int]] = []
    answers: list[Answer] = []
    chunk = chunk_users if point.score_all is not None else max(1, min(chunk_users, 32))
    starts = range(0, len(users), chunk)
    for start in progress_bar(starts, f"rank {point.method} {point.knob}", enabled=progress, total=len(starts)):
        rows = torch.arange(start, min(start + chunk, len(users)))
        banned = (
            data.exclude[start : start + len(rows)] if data.exclude else [torch.empty(0, dtype=torch.long)] * len(rows)
        )
        if point.score_all is not None:
            scores = point.score_all(users.select(rows)).clone()  # (U, N)
            owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(b) for b in banned]))
            if len(owner):
                scores[owner, data.rows_of(torch.cat(banned))] = float("-inf")
            top = torch.topk(scores, min(k, data.num_items), dim=1)
            for ids, values in zip(data.item_ids[top.indices], top.values, strict=True):
                retrieved.append(ids[torch.isfinite(values)].tolist())
                answers.append(Answer([], data.num_items, 0, point.flops_per_query))
            continue
        ask = k + max((len(b) for b in banned), default=0)
        got = point.retriever(users.select(rows), ask)
        answers.extend(got)
        for answer, excluded in zip(got, banned, strict=True):
            skip = set(excluded.tolist())
            retrieved.append([i for i in answer.item_ids if i not in skip][:k])
    return retrieved, answers


def evaluate(
    point: SweepPoint,
    data: BenchData,
    references: dict[str, list[list[int]]],
    k_values: tuple[int, ...] = K_VALUES,
    latency_users: int = 50,
    ranked: tuple[list[list[int]], list[Answer], float] | None = None,
) -> dict:
    """Recall@K and NDCG@K of one retriever over every eval user, then single-query latency.

    `ranked` (retrieved lists, answers, seconds) reuses a ranking already computed with `rank_users`.
    """
    k_max = max(k_values)
    users = data.eval_users
    if ranked is None:
        started = time.perf_counter()
        retrieved, answers = rank_users(point, data, k_max)
        batched_seconds = time.perf_counter() - started
    else:
        retrieved, answers, batched_seconds = ranked
    single = []
    for u in range(min(latency_users, len(users))):
        started = time.perf_counter()
        point.retriever(users.select(torch.tensor([u])), k_max)
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
        result[f"ndcg@{k}"] = ndcg_at_k(retrieved, data.relevant, k)
        for name, reference in references.items():
            result[f"recall@{k}_vs_{name}"] = _recall_vs_ranked(retrieved, reference, k)
    return result


def _recall_vs_ranked(retrieved: list[list[int]], ranked_truth: list[list[int]], k: int) -> float:
    """Recall of the reference's top-k (the reference lists are ranked, best first)."""
    return recall_at_k(retrieved, [set(t[:k]) for t in ranked_truth], k)
