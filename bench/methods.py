"""The methods under comparison, each turned into sweep points (retrievers at one cost setting).

Two Tower + exact MIPS; EBR = the same Two Tower behind faiss IVF and HNSW; a MoNN scoring
every item; HSNN with four index builders (joint LTI, k-means on trained embeddings, EM
alternation, an existing hierarchy). All train on the same batches for the same number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import faiss
import numpy as np
import torch
from torch import Tensor

from bench.deep_retrieval import DeepRetrievalConfig, train_deep_retrieval
from bench.exhaustive import retrieve_exhaustive
from bench.harness import Answer, BenchData, SweepPoint, train_for
from hsnn.config import HSNNConfig
from hsnn.features import TrainingBatch
from hsnn.index import build_index, encode_catalog
from hsnn.lti import kmeans
from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.serving import retrieve

SCORING_CHUNK = 65_536
MAX_PAIRS = 200_000  # (user, item) pairs per retrieve() call in the HSNN sweeps


@torch.no_grad()
def _item_vectors(model: MoNN, data: BenchData) -> Tensor:
    model.eval()
    rows = torch.arange(data.num_items)
    return torch.cat([model.encode_items(data.items.select(chunk)).flatten(1) for chunk in rows.split(SCORING_CHUNK)])


def two_tower_points(model: MoNN, data: BenchData, nprobes: Sequence[int], ef_searches: Sequence[int]) -> list:
    """Exact MIPS, then faiss IVF (nprobe sweep) and HNSW (efSearch sweep) over the same embeddings."""
    vectors = _item_vectors(model, data)
    dim = vectors.shape[1]
    matrix = np.ascontiguousarray(vectors.numpy().astype(np.float32))
    ids = data.item_ids

    @torch.no_grad()
    def user_vectors(users) -> np.ndarray:
        model.eval()
        return np.ascontiguousarray(model.encode_users(users).flatten(1).numpy().astype(np.float32))

    @torch.no_grad()
    def exact(users, k: int) -> list[Answer]:
        scores = torch.from_numpy(user_vectors(users)) @ vectors.T
        top = torch.topk(scores, min(k, data.num_items), dim=1).indices
        return [Answer(ids[row].tolist(), data.num_items, 0, 2 * dim * data.num_items) for row in top]

    @torch.no_grad()
    def exact_scores(users) -> Tensor:
        return torch.from_numpy(user_vectors(users)) @ vectors.T  # (U, N)

    # ranked by the harness as one masked score matrix per chunk of users
    points = [SweepPoint("two_tower_exact", "exact", exact, score_all=exact_scores, flops_per_query=2 * dim * len(ids))]

    nlist = max(4, int(math.sqrt(data.num_items)))
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(matrix)
    ivf.add(matrix)
    list_sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])

    def ivf_retriever(nprobe: int):
        def run(users, k: int) -> list[Answer]:
            queries = user_vectors(users)
            ivf.nprobe = nprobe
            _, found = ivf.search(queries, min(k, data.num_items))
            _, probed = quantizer.search(queries, nprobe)
            answers = []
            for row, lists in zip(found, probed, strict=True):
                scored = int(list_sizes[lists].sum())
                answers.append(Answer(ids[row[row >= 0]].tolist(), scored, nlist, 2 * dim * (scored + nlist)))
            return answers

        return run

    points += [SweepPoint("ebr_ivf", f"nprobe={p}", ivf_retriever(p)) for p in nprobes if p <= nlist]

    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(matrix)

    def hnsw_retriever(ef: int):
        def run(users, k: int) -> list[Answer]:
            queries = user_vectors(users)
            hnsw.hnsw.efSearch = max(ef, k)
            answers = []
            for query in queries:  # one at a time so the distance count is per query
                faiss.cvar.hnsw_stats.reset()
                _, found = hnsw.search(query[None], min(k, data.num_items))
                scored = int(faiss.cvar.hnsw_stats.ndis)
                answers.append(Answer(ids[found[0][found[0] >= 0]].tolist(), scored, 0, 2 * dim * scored))
            return answers

        return run

    points += [SweepPoint("ebr_hnsw", f"efSearch={ef}", hnsw_retriever(ef)) for ef in ef_searches]
    return points


def monn_brute_force_point(model: MoNN, data: BenchData) -> SweepPoint:
    """The MoNN scoring every item: the quality ceiling and the cost ceiling."""
    item_emb = torch.cat(
        [model.encode_items(data.items.select(c)) for c in torch.arange(data.num_items).split(SCORING_CHUNK)]
    ).detach()
    pair_flops = model.pair_flops()

    @torch.no_grad()
    def run(users, k: int) -> list[Answer]:
        model.eval()
        user_emb = model.encode_users(users)
        answers = []
        for u in range(len(users)):
            scores = []
            for rows in torch.arange(data.num_items).split(SCORING_CHUNK):
                pair_user = torch.full((len(rows),), u)
                interaction = model.encode_interactions(users, data.items, pair_user, rows)
                scores.append(model.pair_logits(user_emb[pair_user], item_emb[rows], interaction)[:, 0])
            top = torch.topk(torch.cat(scores), min(k, data.num_items)).indices
            answers.append(Answer(data.item_ids[top].tolist(), data.num_items, 0, data.num_items * pair_flops))
        return answers

    return SweepPoint("monn_brute_force", "all items", run)


def hsnn_points(name: str, model: HSNN, data: BenchData, beams: Sequence[Sequence[int]], paths: Tensor | None):
    """Layer-wise retrieval at each beam setting, plus the same model's exhaustive scoring."""
    index = build_index(model, data.item_ids, data.items, paths=paths, progress=True)

    def at(beam: Sequence[int]):
        # users per retrieve() call so that at most MAX_PAIRS (user, item) pairs are scored at once: a wide
        # beam over an unbalanced index (the given hierarchy's leaves) scores tens of thousands of items per
        # user, millions of pair activations for 32 users (a full simulator run was OOM-killed in that sweep)
        worst_leaves = torch.sort(index.levels[-1].sizes, descending=True).values[: beam[-1]]
        users_per_call = max(1, MAX_PAIRS // max(1, int(worst_leaves.sum())))

        def run(users, k: int) -> list[Answer]:
            answers = []
            for start in range(0, len(users), users_per_call):
                rows = torch.arange(start, min(start + users_per_call, len(users)))
                answers += [
                    Answer(r.item_ids.tolist(), r.cost.items_scored, r.cost.nodes_scored, r.cost.flops)
                    for r in retrieve(model, index, users.select(rows), k, list(beam))
                ]
            return answers

        return run

    def exhaustive(users, k: int) -> list[Answer]:
        return [
            Answer(r.item_ids.tolist(), r.cost.items_scored, r.cost.nodes_scored, r.cost.flops)
            for r in retrieve_exhaustive(model, index, users, k)
        ]

    points = [SweepPoint(name, f"beams={list(b)}", at(b)) for b in beams]
    return points, SweepPoint(f"{name}_exhaustive", "all items", exhaustive), index


# ---------------------------------------------------------------- index builders


def residual_kmeans(vectors: Tensor, sizes: Sequence[int], seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """Paths (N, levels) and per-level codebooks from k-means on the residuals, level by level."""
    residual, codes, books = vectors, [], []
    for level, size in enumerate(sizes):
        centroids = kmeans(residual, size, iterations=15, seed=seed + level)
        code = torch.cdist(residual, centroids).argmin(dim=1)
        residual = residual - centroids[code]
        codes.append(code)
        books.append(centroids)
    return torch.stack(codes, dim=1), books


def residual_centroids(vectors: Tensor, paths: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Codebooks that best fit given paths: per level, the mean residual of the items holding each code."""
    residual, books = vectors, []
    for level, size in enumerate(sizes):
        code = paths[:, level]
        sums = torch.zeros(size, vectors.shape[1]).index_add_(0, code, residual)
        counts = torch.bincount(code, minlength=size).clamp(min=1).unsqueeze(1)
        book = sums / counts
        residual = residual - book[code]
        books.append(book)
    return books


def _set_codebooks(model: HSNN, books: list[Tensor]) -> None:
    with torch.no_grad():
        for level, book in zip(model.index.levels, books, strict=True):
            level.codebook.copy_(book)


def with_paths(data: BenchData, paths: Tensor):
    """A batch transform giving each row its item's fixed path (a copy: cached batches stay untouched)."""

    def attach(batch: TrainingBatch) -> TrainingBatch:
        keys = batch.item_keys if batch.item_keys is not None else batch.items.sparse["item_id"]
        return dataclasses.replace(batch, item_paths=paths[data.rows_of(keys)])

    return attach


@torch.no_grad()
def _catalog_vectors(model: HSNN, data: BenchData) -> Tensor:
    """What the model's index clusters, for every catalogue item (the k-means and EM builders use it too)."""
    return model.index_vectors(encode_catalog(model, data.items), data.items).detach()


def build_hsnn(
    builder: str,
    config: HSNNConfig,
    data: BenchData,
    steps: int,
    seed: int,
    fixed_at: int | None = None,
    em_rounds: int = 3,
    lr: float = 3e-3,
):
    """Train an HSNN with one of the index builders; returns (model, fixed paths or None, train seconds).

    Every builder gets the same number of training batches; batch seeds differ per phase, so a later
    phase continues the stream instead of replaying the first batches. k-means clusters after `fixed_at`
    steps (default half), where the joint index freezes.
    """
    fixed_at = steps // 2 if fixed_at is None else fixed_at
    torch.manual_seed(seed)
    sizes = [level.num_nodes for level in config.levels]
    if builder == "joint":
        model = HSNN(config)
        return model, None, train_for(model, data, steps, seed, "hsnn joint LTI", lr=lr)
    if builder == "kmeans":
        # separate index learning: train without index gradients, cluster the trained embeddings once,
        # then keep training the level models on that fixed index
        model = HSNN(config.model_copy(update={"use_joint_index": False}))
        seconds = train_for(model, data, fixed_at, seed, "hsnn k-means (phase 1)", lr=lr)
        paths, books = residual_kmeans(_catalog_vectors(model, data), sizes, seed)
        _set_codebooks(model, books)
        if model.node_means is not None:
            model.node_means.reset()  # the clustered paths replace the ones the rows were built on
        seconds += train_for(
            model, data, steps - fixed_at, seed + 1, "hsnn k-means (phase 2)", transform=with_paths(data, paths), lr=lr
        )
        return model, paths, seconds
    if builder == "em":
        # EM alternation: train, re-cluster the trained embeddings, train on that index, repeat (the first
        # round trains before it clusters, so no round clusters an untrained item tower)
        model = HSNN(config.model_copy(update={"use_joint_index": False}))
        per_round = max(1, steps // (em_rounds + 1))
        seconds = train_for(model, data, per_round, seed, "hsnn EM warm-up", lr=lr)
        paths = None
        for round_ in range(em_rounds):
            paths, books = residual_kmeans(_catalog_vectors(model, data), sizes, seed + round_)
            _set_codebooks(model, books)
            if model.node_means is not None:
                model.node_means.reset()
            budget = per_round if round_ < em_rounds - 1 else steps - per_round * em_rounds
            seconds += train_for(
                model,
                data,
                budget,
                seed + 1 + round_,
                f"hsnn EM round {round_ + 1}",
                transform=with_paths(data, paths),
                lr=lr,
            )
        return model, paths, seconds
    if builder == "hierarchy":
        if data.hierarchy is None:
            raise ValueError(f"{data.name} has no existing item hierarchy")
        model = HSNN(config)
        paths = data.hierarchy
        _set_codebooks(model, residual_centroids(_catalog_vectors(model, data), paths, sizes))
        return (
            model,
            paths,
            train_for(model, data, steps, seed, "hsnn hierarchy", transform=with_paths(data, paths), lr=lr),
        )
    raise ValueError(f"unknown index builder {builder!r}")


def deep_retrieval_points(
    data: BenchData, steps: int, seed: int, beams: Sequence[int], reranker: MoNN, quick: bool
) -> list[SweepPoint]:
    """Deep Retrieval (K^D code paths learned by EM), reranked by the Two Tower model as DR is used."""
    config = DeepRetrievalConfig(seed=seed)
    if quick:
        config = config.model_copy(update={"num_codes": 16, "depth": 2, "paths_per_item": 2, "em_iterations": 2})
    model = train_deep_retrieval(config, data.schema, data.item_ids, data.batches(steps, seed), steps=steps)
    vectors = _item_vectors(reranker, data)

    @torch.no_grad()
    def two_tower_scores(users, pair_user: Tensor, item_rows: Tensor) -> Tensor:
        reranker.eval()
        user_vectors = reranker.encode_users(users).flatten(1)
        return (user_vectors[pair_user] * vectors[item_rows]).sum(dim=1)

    def at(beam: int):
        def run(users, k: int) -> list[Answer]:
            found, cost = model.retrieve(users, k, beam=beam, scorer=two_tower_scores)
            return [
                Answer(ids.tolist(), int(cost.items_collected[u]), int(cost.nodes_scored[u]))
                for u, (ids, _) in enumerate(found)
            ]

        return run

    return [SweepPoint("deep_retrieval", f"beam={b}", at(b)) for b in beams]
