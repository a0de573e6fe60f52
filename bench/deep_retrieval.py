"""Deep Retrieval (DR) baseline: items live on paths in a K^D code space, found by beam search.

Gao et al., "Deep Retrieval": every item is given J paths (c_1, ..., c_D), each code one of K
values. A structure model gives p(c_d | user, c_1..c_{d-1}) with one K-way softmax per layer,
the earlier codes embedded and concatenated to the user vector, so
log p(path | user) = sum_d log p(c_d | user, c_<d). The paths are discrete parameters learned
jointly with the network by EM:

- init: J distinct random paths per item;
- M-step: a number of optimiser steps on -sum_j log p(path_j(item) | user) over (user, positive
  item) pairs. The J paths of an item get uniform weight 1 (a cross entropy towards all of
  them), not per-path posterior weights;
- E-step: candidate paths for an item come from beam searches over its training users (never
  the full K^D space), plus the item's current paths. Each candidate is scored exactly over all
  of the item's users, by default sum_users log p(path | user) ("sum_log_prob"); the paper's
  log sum_users p(path | user) is the option "log_sum_prob". Items are then assigned greedily,
  one at a time in a seeded random order, their J best candidates under
  score - alpha * (f(n + 1) - f(n)), f(n) = n^4 / 4 as in the paper, n being how many items
  the path already holds in this E-step. Items without any training positive keep their paths.

Training runs M, (E, M) x em_iterations, so `em_iterations=0` is the "random paths" control.

Serving (`DeepRetrievalModel.retrieve`): a beam search keeps the top B partial paths by log
prob at every layer; the items on the final B paths are collected and scored by
log sum_{their paths in the beam} p(path | user), or by a given scorer (e.g. a Two Tower model:
how DR is used in practice, as a candidate generator followed by a reranker). The cost
reported per user is the items collected, the code logits computed (`nodes_scored`, K per
softmax) and the number of K-way softmaxes evaluated.

Defaults (`DeepRetrievalConfig`): the paper's K=100, D=3, J=3 and f(n) = n^4/4 are kept, since
the structure model costs O(B * K * D) per user whatever the catalogue, which is cheap on 2 CPU
cores. What is scaled down is the rest: a 64-wide user tower and 128-wide layer MLPs, a 16-wide
code embedding, 3 EM iterations of 300 M-step steps of 256 pairs, beam 32 at serving and a 16
wide beam per user in the E-step (the paper used larger beams and far longer training). The
penalty alpha=1e-3 is "small" in the paper's sense: with sum-of-log-prob scores (a few nats per
user) it only bites once a path holds about 10 items (marginal f cost 1e-3 * 10^3 = 1 nat),
well below any path size that would make a beam of 32 collect most of a large catalogue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from clitools.progress import progress_bar
from hsnn.config import FeatureSchema, StrictModel, TowerConfig
from hsnn.features import TrainingBatch, UserBatch
from hsnn.monn import Tower, mlp

PairSource = Iterable[tuple[UserBatch, Tensor] | TrainingBatch]
PairScorer = Callable[[UserBatch, Tensor, Tensor], Tensor]


class DeepRetrievalConfig(StrictModel):
    """DR hyper-parameters; names map to the paper's K, D, J, alpha and B as noted."""

    num_codes: int = Field(100, ge=2, description="K: codes per layer.")
    depth: int = Field(3, ge=1, description="D: layers, i.e. codes per path.")
    paths_per_item: int = Field(3, ge=1, description="J: paths per item.")
    path_penalty: float = Field(1e-3, ge=0, description="alpha in score - alpha * f(|path|), f(n) = n^4 / 4.")
    beam_size: int = Field(32, ge=1, description="B: default serving beam.")
    estep_beam: int = Field(16, ge=1, description="Beam per training user that proposes an item's candidate paths.")
    estep_candidates: int = Field(16, ge=1, description="Most beam-proposed candidate paths kept per item.")
    estep_score: Literal["sum_log_prob", "log_sum_prob"] = "sum_log_prob"
    user_tower: TowerConfig = Field(
        default_factory=lambda: TowerConfig(num_embed=1, dim=64, sparse_dim=16, hidden=[128], afm_attention_dim=16)
    )
    code_dim: int = Field(16, ge=1, description="Width of the embedding of an earlier code fed to later layers.")
    layer_hidden: int = Field(128, ge=1, description="Hidden width of each layer's softmax MLP.")
    em_iterations: int = Field(3, ge=0, description="E-steps; there are em_iterations + 1 M-steps.")
    steps_per_mstep: int = Field(300, ge=1)
    batch_size: int = Field(256, ge=1, description="(user, positive item) pairs per M-step step.")
    lr: float = Field(3e-3, gt=0)
    positive_task: int = Field(0, ge=0, description="TrainingBatch label column that marks a positive (click).")
    seed: int = 0

    @model_validator(mode="after")
    def _paths_fit(self) -> DeepRetrievalConfig:
        space = self.num_codes**self.depth
        if space >= 2**53:
            raise ValueError(f"K^D = {space} paths do not fit the int64 path keys")
        if space < self.paths_per_item:
            raise ValueError(f"K^D = {space} paths cannot give every item {self.paths_per_item} distinct paths")
        return self

    @property
    def num_paths(self) -> int:
        return self.num_codes**self.depth


class StructureModel(nn.Module):
    """User tower + D softmax layers: p(c_d | user, c_<d) from concat(user, emb(c_1), ..., emb(c_{d-1}))."""

    def __init__(self, config: DeepRetrievalConfig, schema: FeatureSchema):
        super().__init__()
        self.config, self.schema = config, schema
        buckets = dict(schema.user_sparse)
        buckets.update({f"history_{a}": schema.item_sparse[a] for a in schema.history_attributes})
        self.tower = Tower(config.user_tower, schema.user_dense_dim, buckets)
        user_dim = config.user_tower.num_embed * config.user_tower.dim
        self.code_embeddings = nn.ModuleList(
            nn.Embedding(config.num_codes, config.code_dim) for _ in range(config.depth - 1)
        )
        self.layers = nn.ModuleList(
            mlp([user_dim + d * config.code_dim, config.layer_hidden, config.num_codes]) for d in range(config.depth)
        )

    def encode_users(self, users: UserBatch) -> Tensor:
        """(U, user_dim), the same user features as MoNN.encode_users."""
        sparse = dict(users.sparse)
        sparse.update({f"history_{a}": users.history[a] for a in self.schema.history_attributes})
        return F.relu(self.tower(users.dense, sparse).flatten(1))

    def layer_log_probs(self, user_vec: Tensor, prefix: Tensor) -> Tensor:
        """user_vec (N, user_dim), prefix (N, d) codes -> (N, K) log p(c_{d+1} | user, prefix)."""
        d = prefix.shape[1]
        parts = [user_vec] + [self.code_embeddings[i](prefix[:, i]) for i in range(d)]
        return F.log_softmax(self.layers[d](torch.cat(parts, dim=1)), dim=1)

    def path_log_prob(self, user_vec: Tensor, paths: Tensor) -> Tensor:
        """user_vec (N, user_dim), paths (N, D) -> (N,) log p(path | user) (teacher forced)."""
        total = user_vec.new_zeros(paths.shape[0])
        for d in range(self.config.depth):
            logp = self.layer_log_probs(user_vec, paths[:, :d])
            total = total + logp.gather(1, paths[:, d : d + 1]).squeeze(1)
        return total

    def beam_search(self, user_vec: Tensor, beam: int) -> tuple[Tensor, Tensor, int, int]:
        """Top `beam` paths per user by log prob.

        Returns paths (U, b, D), their log probs (U, b) best first, and per user the code logits
        computed and the K-way softmaxes evaluated. b = min(beam, K^D); paths are distinct.
        """
        num_users, K = user_vec.shape[0], self.config.num_codes
        paths = user_vec.new_zeros(num_users, 1, 0, dtype=torch.long)
        scores = user_vec.new_zeros(num_users, 1)
        softmaxes = 0
        for d in range(self.config.depth):
            width = paths.shape[1]
            softmaxes += width
            flat_user = user_vec.unsqueeze(1).expand(-1, width, -1).reshape(num_users * width, -1)
            logp = self.layer_log_probs(flat_user, paths.reshape(num_users * width, d)).view(num_users, width, K)
            total = (scores.unsqueeze(2) + logp).view(num_users, width * K)
            keep = min(beam, width * K)
            scores, chosen = total.topk(keep, dim=1)
            parent, code = chosen // K, chosen % K
            paths = torch.cat([paths.gather(1, parent.unsqueeze(2).expand(-1, -1, d)), code.unsqueeze(2)], dim=2)
        return paths, scores, softmaxes * K, softmaxes


@dataclass
class RetrievalCost:
    """Per-user serving cost of one `retrieve` call."""

    items_collected: Tensor  # (U,) distinct items on the final beam paths
    nodes_scored: Tensor  # (U,) code logits computed by the beam search (K per softmax)
    softmax_evals: Tensor  # (U,) K-way softmaxes evaluated
    items_reranked: Tensor  # (U,) pairs sent to the scorer (0 without one)

    def mean(self) -> dict[str, float]:
        return {name: float(getattr(self, name).double().mean()) for name in self.__dataclass_fields__}


@dataclass
class DeepRetrievalModel:
    """A trained structure model plus the item -> paths assignment."""

    config: DeepRetrievalConfig
    structure: StructureModel
    item_ids: Tensor  # (N,) catalogue ids, row i of `paths` is item_ids[i]
    paths: Tensor  # (N, J, D) long, the J distinct paths of every item
    history: list[dict[str, float]] = field(default_factory=list)

    def path_keys(self) -> Tensor:
        """(N, J) int64 key of each path: its codes read as a base-K number."""
        return encode_paths(self.paths, self.config.num_codes)

    def occupied_paths(self) -> Tensor:
        """(P, D) the paths holding at least one item, ordered by key (matches path_sizes)."""
        keys = torch.unique(self.path_keys().flatten())
        return decode_paths(keys, self.config.num_codes, self.config.depth)

    def path_sizes(self) -> Tensor:
        """(P,) items on each occupied path, ordered by path key."""
        return torch.unique(self.path_keys().flatten(), return_counts=True)[1]

    def path_index(self) -> tuple[Tensor, Tensor, Tensor]:
        """CSR path -> items: sorted occupied path keys, offsets into `rows`, item rows (one sort, cheap)."""
        keys = self.path_keys().flatten()
        order = torch.argsort(keys, stable=True)
        unique, counts = torch.unique_consecutive(keys[order], return_counts=True)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return unique, offsets, order // self.config.paths_per_item

    @torch.no_grad()
    def retrieve(
        self, users: UserBatch, k: int, beam: int | None = None, scorer: PairScorer | None = None
    ) -> tuple[list[tuple[Tensor, Tensor]], RetrievalCost]:
        """Top-k (item_ids, scores) per user, best first, and the cost of finding them.

        Without `scorer` an item scores log sum_{its paths in the final beam} p(path | user).
        With `scorer(users, pair_user, item_rows) -> (P,) scores` every collected item is
        reranked by it (item_rows index `item_ids`).
        """
        beam = self.config.beam_size if beam is None else beam
        self.structure.eval()
        device = next(self.structure.parameters()).device
        users = users.to(device)
        num_users = len(users)
        beam_paths, beam_scores, nodes, softmaxes = self.structure.beam_search(self.structure.encode_users(users), beam)
        beam_paths, beam_scores = beam_paths.cpu(), beam_scores.cpu()
        unique, offsets, rows = self.path_index()
        keys = encode_paths(beam_paths, self.config.num_codes).flatten()
        pos = torch.searchsorted(unique, keys).clamp(max=max(len(unique) - 1, 0))
        hit = unique[pos] == keys
        sizes = torch.where(hit, offsets[pos + 1] - offsets[pos], torch.zeros_like(pos))
        # expand every (user, beam path) to the items it holds
        entry = torch.repeat_interleave(torch.arange(len(keys)), sizes)
        within = torch.arange(len(entry)) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
        item_rows = rows[offsets[pos][entry] + within]
        user_of = entry // beam_paths.shape[1]
        path_score = beam_scores.flatten()[entry]
        # one row per (user, item): log sum exp over the item's paths in the beam
        num_items = len(self.item_ids)
        pair_key, inverse = torch.unique(user_of * num_items + item_rows, return_inverse=True)
        best = torch.full((len(pair_key),), -math.inf).scatter_reduce(0, inverse, path_score, "amax")
        mass = torch.zeros(len(pair_key)).index_add_(0, inverse, (path_score - best[inverse]).exp())
        pair_score = best + mass.log()
        pair_user, pair_item = pair_key // num_items, pair_key % num_items
        collected = torch.bincount(pair_user, minlength=num_users)
        reranked = torch.zeros(num_users, dtype=torch.long)
        if scorer is not None and len(pair_key):
            pair_score = scorer(users, pair_user.to(device), pair_item.to(device)).detach().float().cpu()
            reranked = collected.clone()
        results = []
        for part_item, part_score in zip(
            pair_item.split(collected.tolist()), pair_score.split(collected.tolist()), strict=True
        ):
            top = torch.argsort(part_score, descending=True, stable=True)[:k]
            results.append((self.item_ids[part_item[top]], part_score[top]))
        per_user = torch.full((num_users,), nodes, dtype=torch.long)
        cost = RetrievalCost(collected, per_user, torch.full((num_users,), softmaxes, dtype=torch.long), reranked)
        return results, cost


def encode_paths(paths: Tensor, num_codes: int) -> Tensor:
    """(..., D) codes -> (...) int64 keys (base-K digits, c_1 most significant)."""
    keys = torch.zeros(paths.shape[:-1], dtype=torch.long, device=paths.device)
    for d in range(paths.shape[-1]):
        keys = keys * num_codes + paths[..., d]
    return keys


def decode_paths(keys: Tensor, num_codes: int, depth: int) -> Tensor:
    digits = []
    for _ in range(depth):
        digits.append(keys % num_codes)
        keys = keys // num_codes
    return torch.stack(digits[::-1], dim=-1)


def random_paths(num_items: int, config: DeepRetrievalConfig, generator: torch.Generator) -> Tensor:
    """(N, J, D): J distinct uniformly random paths per item."""
    J, space = config.paths_per_item, config.num_paths
    keys = torch.randint(space, (num_items, J), generator=generator)
    for j in range(1, J):
        while True:
            clash = (keys[:, j : j + 1] == keys[:, :j]).any(dim=1)
            if not clash.any():
                break
            keys[clash, j] = torch.randint(space, (int(clash.sum()),), generator=generator)
    return decode_paths(keys, config.num_codes, config.depth)


# ---------------------------------------------------------------------------------------------
# training data: every (user, positive item) pair, pooled into one UserBatch


def _pad_cols(t: Tensor, width: int) -> Tensor:
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


def _concat_users(parts: list[UserBatch]) -> UserBatch:
    def cat(tensors: list[Tensor]) -> Tensor:
        width = max(t.shape[1] for t in tensors)
        return torch.cat([_pad_cols(t, width) for t in tensors])

    first = parts[0]
    return UserBatch(
        dense=torch.cat([p.dense for p in parts]),
        sparse={name: cat([p.sparse[name] for p in parts]) for name in first.sparse},
        history={name: cat([p.history[name] for p in parts]) for name in first.history},
        history_age=cat([p.history_age for p in parts]),
    )


def collect_pairs(source: PairSource, catalog_item_ids: Tensor, positive_task: int = 0) -> tuple[UserBatch, Tensor]:
    """Pool (UserBatch, item_row) chunks, or the positive rows of TrainingBatches, into one UserBatch.

    A TrainingBatch's items are found in the catalogue by `item_keys` (else the `item_id`
    feature); rows whose item is not in the catalogue are dropped.
    """
    ids = catalog_item_ids.long()
    order = torch.argsort(ids)
    sorted_ids = ids[order]
    users, rows = [], []
    for chunk in source:
        if isinstance(chunk, TrainingBatch):
            keep = chunk.labels[:, positive_task] > 0
            keys = chunk.item_keys if chunk.item_keys is not None else chunk.items.sparse["item_id"]
            keys = keys.long().cpu()
            pos = torch.searchsorted(sorted_ids, keys).clamp(max=len(ids) - 1)
            keep = keep.cpu() & (sorted_ids[pos] == keys)
            chunk_users, chunk_rows = chunk.users.select(torch.nonzero(keep).flatten()), order[pos[keep]]
        else:
            chunk_users, chunk_rows = chunk
        if len(chunk_rows):
            users.append(chunk_users.to("cpu"))
            rows.append(chunk_rows.long().cpu())
    if not users:
        raise ValueError("no (user, positive item) pairs to train Deep Retrieval on")
    return _concat_users(users), torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# EM


def _m_step(
    model: DeepRetrievalModel,
    optimizer: torch.optim.Optimizer,
    users: UserBatch,
    item_rows: Tensor,
    steps: int,
    generator: torch.Generator,
    device: torch.device,
    label: str,
    progress: bool,
) -> float:
    """`steps` Adam steps on -sum_j log p(path_j(item) | user); returns the mean loss of the last tenth."""
    config, structure = model.config, model.structure
    structure.train()
    J = config.paths_per_item
    paths = model.paths.to(device)
    losses = []
    for _ in progress_bar(range(steps), label, progress):
        batch = torch.randint(len(item_rows), (min(config.batch_size, len(item_rows)),), generator=generator)
        user_vec = structure.encode_users(users.select(batch).to(device))
        item_paths = paths[item_rows[batch].to(device)]  # (b, J, D)
        flat_user = user_vec.unsqueeze(1).expand(-1, J, -1).reshape(-1, user_vec.shape[1])
        logp = structure.path_log_prob(flat_user, item_paths.reshape(-1, config.depth))
        loss = -logp.view(-1, J).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


@torch.no_grad()
def _candidate_paths(
    model: DeepRetrievalModel, users: UserBatch, item_rows: Tensor, device: torch.device, chunk: int
) -> tuple[Tensor, Tensor]:
    """Per item: its current paths plus the `estep_candidates` paths with the most beam mass over its users.

    Returns CSR (offsets (N+1,), keys) of the candidate path keys per item.
    """
    config, structure = model.config, model.structure
    num_items, space = len(model.item_ids), config.num_paths
    pair_keys, pair_mass = [], []
    for start in range(0, len(item_rows), chunk):
        part = torch.arange(start, min(start + chunk, len(item_rows)))
        user_vec = structure.encode_users(users.select(part).to(device))
        paths, scores, _, _ = structure.beam_search(user_vec, config.estep_beam)
        keys = encode_paths(paths, config.num_codes).cpu()
        pair_keys.append(item_rows[part].unsqueeze(1) * space + keys)
        pair_mass.append(scores.exp().cpu().double())
    combined, inverse = torch.unique(torch.cat([k.flatten() for k in pair_keys]), return_inverse=True)
    mass = torch.zeros(len(combined), dtype=torch.float64).index_add_(0, inverse, torch.cat(pair_mass).flatten())
    item_of, key_of = combined // space, combined % space
    # rank candidates within each item by beam mass, keep the best estep_candidates
    by_mass = torch.argsort(mass, descending=True, stable=True)
    order = by_mass[torch.argsort(item_of[by_mass], stable=True)]  # by item, then mass descending
    item_of, key_of = item_of[order], key_of[order]
    counts = torch.bincount(item_of, minlength=num_items)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(item_of)) - start[item_of]
    keep = rank < config.estep_candidates
    item_of = torch.cat([item_of[keep], torch.arange(num_items).repeat_interleave(config.paths_per_item)])
    key_of = torch.cat([key_of[keep], model.path_keys().flatten()])
    merged = torch.unique(item_of * space + key_of)  # sorted by item, then key; duplicates gone
    counts = torch.bincount(merged // space, minlength=num_items)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return offsets, merged % space


@torch.no_grad()
def _score_candidates(
    model: DeepRetrievalModel,
    users: UserBatch,
    item_rows: Tensor,
    offsets: Tensor,
    cand_keys: Tensor,
    device: torch.device,
    chunk: int,
) -> Tensor:
    """Score of every candidate (aligned with cand_keys) over all of its item's training users."""
    config, structure = model.config, model.structure
    log_sum = config.estep_score == "log_sum_prob"
    totals = torch.zeros(len(cand_keys), dtype=torch.float64)
    sizes = offsets[1:] - offsets[:-1]
    for start in range(0, len(item_rows), chunk):
        part = torch.arange(start, min(start + chunk, len(item_rows)))
        rows = item_rows[part]
        user_vec = structure.encode_users(users.select(part).to(device))
        n = sizes[rows]
        pair = torch.repeat_interleave(torch.arange(len(part)), n)
        slot = offsets[rows][pair] + torch.arange(len(pair)) - torch.repeat_interleave(n.cumsum(0) - n, n)
        paths = decode_paths(cand_keys[slot], config.num_codes, config.depth).to(device)
        logp = structure.path_log_prob(user_vec[pair.to(device)], paths).double().cpu()
        totals.index_add_(0, slot, logp.exp() if log_sum else logp)
    if log_sum:
        totals = totals.clamp(min=1e-300).log()
    return totals


def _assign_paths(
    model: DeepRetrievalModel,
    offsets: Tensor,
    cand_keys: Tensor,
    scores: Tensor,
    has_users: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Greedy E-step: items in random order each take their J best candidates under the size penalty."""
    config = model.config
    J, alpha = config.paths_per_item, config.path_penalty
    keys = model.path_keys().clone()
    sizes: dict[int, int] = {}
    for key in keys[~has_users].flatten().tolist():  # items without users keep their paths
        sizes[key] = sizes.get(key, 0) + 1
    off, cand, score = offsets.tolist(), cand_keys.numpy(), scores.numpy()
    for item in torch.nonzero(has_users).flatten()[torch.randperm(int(has_users.sum()), generator=generator)].tolist():
        c_keys, c_score = cand[off[item] : off[item + 1]], score[off[item] : off[item + 1]].copy()
        chosen = []
        for _ in range(J):
            n = np.array([sizes.get(int(k), 0) for k in c_keys], dtype=np.float64)
            gain = c_score - alpha * ((n + 1) ** 4 - n**4) / 4
            gain[chosen] = -np.inf
            best = int(np.argmax(gain))
            chosen.append(best)
            sizes[int(c_keys[best])] = sizes.get(int(c_keys[best]), 0) + 1
        keys[item] = torch.as_tensor(c_keys[chosen], dtype=torch.long)
    return decode_paths(keys, config.num_codes, config.depth)


def train_deep_retrieval(
    config: DeepRetrievalConfig,
    schema: FeatureSchema,
    catalog_item_ids: Tensor,
    train_pairs: PairSource,
    steps: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    estep_chunk: int = 2048,
) -> DeepRetrievalModel:
    """Learn the structure model and the item paths by EM (see the module docstring).

    `train_pairs` yields (UserBatch, item_row tensor) chunks, item rows indexing
    `catalog_item_ids`, or TrainingBatches whose positive rows (`positive_task` label > 0)
    are used. They are pooled in memory once. `steps` is the total M-step budget, split evenly
    over the em_iterations + 1 M-steps (default em_iterations+1 times steps_per_mstep).
    Reproducible for a given config.seed; the global torch RNG is left untouched.
    """
    device = torch.device(device)
    users, item_rows = collect_pairs(train_pairs, catalog_item_ids, config.positive_task)
    num_items = len(catalog_item_ids)
    if num_items * config.num_paths >= 2**62:
        raise ValueError("items x K^D does not fit the int64 (item, path) keys of the E-step")
    if int(item_rows.max()) >= num_items or int(item_rows.min()) < 0:
        raise ValueError("item rows must index catalog_item_ids")
    m_steps = config.em_iterations + 1
    per_mstep = config.steps_per_mstep if steps is None else max(1, steps // m_steps)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        structure = StructureModel(config, schema).to(device)
    model = DeepRetrievalModel(config, structure, catalog_item_ids.clone(), random_paths(num_items, config, generator))
    optimizer = torch.optim.Adam(structure.parameters(), lr=config.lr)
    has_users = torch.bincount(item_rows, minlength=num_items) > 0
    for iteration in range(m_steps):
        label = f"DR M-step {iteration + 1}/{m_steps}"
        loss = _m_step(model, optimizer, users, item_rows, per_mstep, generator, device, label, progress)
        record = {"iteration": float(iteration), "loss": loss, "max_path_size": float(model.path_sizes().max())}
        if iteration < config.em_iterations:
            structure.eval()
            offsets, cand_keys = _candidate_paths(model, users, item_rows, device, estep_chunk)
            scores = _score_candidates(model, users, item_rows, offsets, cand_keys, device, estep_chunk)
            old = model.path_keys()
            model.paths = _assign_paths(model, offsets, cand_keys, scores, has_users, generator)
            changed = (torch.sort(model.path_keys(), dim=1).values != torch.sort(old, dim=1).values).any(dim=1)
            record.update(
                {
                    "items_moved": float(changed.sum()),
                    "mean_candidates": float((offsets[1:] - offsets[:-1]).double().mean()),
                    "max_path_size_after_estep": float(model.path_sizes().max()),
                }
            )
        model.history.append(record)
    structure.eval()
    return model
