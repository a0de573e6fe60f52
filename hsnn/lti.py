"""Learning To Index: a differentiable codebook per level, stacked residually (RQ-style).

For an input v and codes c_1..c_K: d_k = ||v - c_k||^2 / (dim * s), s a running mean distance (so alpha
and prices mean the same at any scale of the item tower). Cost e_k = d_k + p_k, p_k the node's price (an
auction's, so no node holds more than its cap). Soft a = softmax(-alpha * e); hard node = argmin_k e_k in
training and serving alike; c_bar = sum_k a_k c_k, the hard code (soft gradient straight through) once
alpha reaches alpha_max. Level l+1 quantises r_{l+1} = r_l - c_bar_l: a level-l node is the path prefix
(k_1 .. k_l), embedded as the sum of its codes, priced per (parent prefix, code).

Paper: HSNN (arXiv 2024) §3.2, Algorithm 1 (soft assignment, temperature schedule, FLOPs regulariser);
prices, k-means seeding, hardening and the build-time cap answer the collapse and imbalance measured on
the plain version (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from operator import mul

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsnn.config import LTIConfig


@dataclass
class LevelOutput:
    soft: Tensor  # (N, K) soft assignment
    node_embedding: Tensor  # (N, dim) c_bar (hard code with straight-through gradient once hardened)
    hard: Tensor  # (N,) argmin node (code at this level)
    flops_loss: Tensor  # scalar, 0 when the regulariser is off


def squared_distances(x: Tensor, codes: Tensor) -> Tensor:
    """Mean squared distance of every row of x to every code: (N, K)."""
    dist = (x * x).sum(1, keepdim=True) - 2 * x @ codes.T + (codes * codes).sum(1)
    return dist.clamp(min=0) / x.shape[1]


def temperature(config: LTIConfig, step: int) -> float:
    """alpha_max * (t / T)^p, floored at alpha_min; constant alpha_max when the schedule is off."""
    if not config.use_temperature_schedule:
        return config.alpha_max
    progress = min(step / config.schedule_steps, 1.0)
    return max(config.alpha_min, config.alpha_max * progress**config.schedule_power)


def is_hardened(config: LTIConfig, step: int) -> bool:
    """True once training uses the hard code (the schedule has reached alpha_max)."""
    if not config.use_hard_assignment:
        return False
    return not config.use_temperature_schedule or step >= config.schedule_steps


def group_means(x: Tensor, group: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Mean row of x per group, (groups, dim) with 0 for an empty group, and the group sizes (groups,)."""
    counts = torch.bincount(group, minlength=groups).to(x.dtype)
    return x.new_zeros(groups, x.shape[1]).index_add_(0, group, x) / counts.clamp(min=1).unsqueeze(1), counts


def rank_in_groups(group: Tensor, key: Tensor, descending: bool = False) -> tuple[Tensor, Tensor]:
    """Positions sorted by group, then by key (stable), and each one's rank inside its group: a segmented sort."""
    order = torch.argsort(key, descending=descending, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    _, sizes = torch.unique_consecutive(group[order], return_counts=True)
    return order, torch.arange(len(order), device=order.device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes
    )


def kmeans(x: Tensor, k: int, iterations: int = 20, seed: int = 0) -> Tensor:
    """Plain Lloyd's k-means with k-means++ seeding; returns (k, dim) centroids."""
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    while len(centroids) < k:
        nearest = squared_distances(x, centroids).amin(dim=1)
        probs = nearest / nearest.sum() if nearest.sum() > 0 else torch.full_like(nearest, 1 / len(x))
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=generator)]])
    for _ in range(iterations):
        means, counts = group_means(x, squared_distances(x, centroids).argmin(dim=1), k)
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
    return centroids


class LearnedIndexLevel(nn.Module):
    """One codebook with its balance aids: per-(parent, node) prices, FLOPs regulariser, dead-code re-seeding."""

    def __init__(self, dim: int, config: LTIConfig, num_parents: int = 1):
        super().__init__()
        self.config = config
        self.num_parents = num_parents
        self.codebook = nn.Parameter(torch.randn(config.num_nodes, dim) * 0.05)
        self.register_buffer("usage_ema", torch.full((config.num_nodes,), 1.0 / config.num_nodes))
        self.register_buffer("price", torch.zeros(num_parents, config.num_nodes))  # (parents, K)
        self.register_buffer("distance_scale", torch.zeros(()))  # 0 until the first training batch
        self._pooled: deque[tuple[Tensor, int]] = deque(maxlen=max(config.flops_pool_batches - 1, 0))
        self._recent_inputs: Tensor | None = None
        self._recent_hard: Tensor | None = None  # the last training batch's inputs and hard nodes
        self.frozen = False  # set by ResidualIndex.freeze; the index-level buffer is what snapshots keep

    @property
    def num_nodes(self) -> int:
        return self.config.num_nodes

    def distances(self, x: Tensor) -> Tensor:
        """(N, K) squared distances in units of the running mean distance."""
        scale = self.distance_scale if float(self.distance_scale) > 0 else torch.ones(())
        return squared_distances(x, self.codebook) / scale

    def costs(self, x: Tensor, parent: Tensor | None) -> Tensor:
        """(N, K) distance + the node's price under each row's parent: what the hard assignment minimises."""
        parent = parent if parent is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
        return self.distances(x) + self.price[parent]  # prices stay 0 unless balance or a capped build set them

    def assign(self, x: Tensor, parent: Tensor | None = None) -> Tensor:
        """Hard node of each row: argmin of distance + price (what training's hard path and serving use)."""
        return self.costs(x, parent).argmin(dim=1)

    def forward(self, x: Tensor, step: int, parent: Tensor | None = None) -> LevelOutput:
        if self.training:
            self._update_scale(x.detach())
        cost = self.costs(x, parent)
        soft = torch.softmax(-temperature(self.config, step) * cost, dim=1)
        hard = cost.argmin(dim=1)
        if is_hardened(self.config, step):
            one_hot = F.one_hot(hard, self.num_nodes).to(soft.dtype)
            weights = one_hot + soft - soft.detach()  # forward: the hard code; backward: the soft gradient
        else:
            weights = soft
        flops_loss = soft.new_zeros(())
        if self.training:
            balanced = soft
            if self.config.flops_at_target_temperature:
                balanced = torch.softmax(-self.config.alpha_max * cost, dim=1)
            flops_loss = self._flops_regularizer(balanced)
            self._track_usage(x.detach(), hard)
        moving = self.config.node_losses_move_codes and not self.frozen
        codebook = self.codebook if moving else self.codebook.detach()
        return LevelOutput(soft=soft, node_embedding=weights @ codebook, hard=hard, flops_loss=flops_loss)

    @torch.no_grad()
    def _update_scale(self, x: Tensor) -> None:
        mean = squared_distances(x, self.codebook).mean().clamp(min=1e-12)
        if float(self.distance_scale) <= 0:
            self.distance_scale.fill_(float(mean))
        else:
            self.distance_scale.mul_(0.99).add_(0.01 * mean)

    def _flops_regularizer(self, soft: Tensor) -> Tensor:
        """K * sum_k (mean soft assignment)^2 over this batch and the last M-1 (detached) ones: 1 when perfectly
        balanced, K when everything sits in one node."""
        if not self.config.use_flops_regularizer:
            return soft.new_zeros(())
        total, count = soft.sum(dim=0), soft.shape[0]
        for past_sum, past_count in self._pooled:
            total, count = total + past_sum, count + past_count
        if self._pooled.maxlen:
            self._pooled.append((soft.sum(dim=0).detach(), soft.shape[0]))
        mean = total / count
        return self.num_nodes * (mean * mean).sum()

    @torch.no_grad()
    def _track_usage(self, x: Tensor, hard: Tensor) -> None:
        share = torch.bincount(hard, minlength=self.num_nodes).to(x.dtype) / len(hard)
        decay = self.config.usage_ema_decay
        self.usage_ema.mul_(decay).add_(share, alpha=1 - decay)
        self._recent_inputs, self._recent_hard = x, hard

    @torch.no_grad()
    def ema_update(self) -> None:
        """code_k <- d * code_k + (1 - d) * mean of the last batch's inputs on node k (nodes with members); run
        after the optimiser step, as the forward's graph still holds the codebook."""
        if not self.config.use_ema_codebook or self._recent_inputs is None or self._recent_hard is None:
            return
        target, counts = group_means(self._recent_inputs, self._recent_hard, self.num_nodes)
        decay, moved = self.config.ema_decay, counts.unsqueeze(1) > 0
        self.codebook.copy_(torch.where(moved, decay * self.codebook + (1 - decay) * target, self.codebook))
        self._recent_hard = None  # one update per batch: steps on a fixed index (no LTI forward) must not replay it

    @torch.no_grad()
    def dead_nodes(self) -> Tensor:
        return torch.nonzero(self.usage_ema < self.config.dead_threshold / self.num_nodes).flatten()

    @torch.no_grad()
    def reseed_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """Move dead codes onto recent inputs drawn from the busiest nodes (splitting them, as a collapsed index
        needs); returns how many moved."""
        if not self.config.use_dead_code_reseed or self._recent_inputs is None:
            return 0
        dead = self.dead_nodes()
        if len(dead) == 0:
            return 0
        x = self._recent_inputs
        weights = self.usage_ema[self.distances(x).argmin(dim=1)].clamp(min=1e-6)
        rows = torch.multinomial(weights, len(dead), replacement=len(dead) > len(x), generator=generator)
        noise = 0.01 * x.std() * torch.randn(len(dead), x.shape[1], generator=generator, dtype=x.dtype)
        self.codebook[dead] = x[rows] + noise
        self.usage_ema[dead] = 1.0 / self.num_nodes
        self.price[:, dead] = 0.0
        return len(dead)


@dataclass
class IndexOutput:
    levels: list[LevelOutput]
    node_embeddings: list[Tensor]  # cumulative sum of c_bar up to each level: the level's node embedding
    reconstruction_loss: Tensor  # ||sum_l c_{k_l} - sg(v)||^2 on the hard path: gradient to the codes only


class ResidualIndex(nn.Module):
    """Levels of LTI, each quantising the residual the previous one left."""

    def __init__(self, dim: int, configs: list[LTIConfig]):
        super().__init__()
        self.dim = dim
        sizes = [c.num_nodes for c in configs]
        self.levels = nn.ModuleList(
            LearnedIndexLevel(dim, c, num_parents=math.prod(sizes[:i])) for i, c in enumerate(configs)
        )
        self.register_buffer("seeded", torch.tensor(False))
        self.register_buffer("frozen", torch.tensor(False))
        self._reservoir: deque[Tensor] = deque(maxlen=64)

    @property
    def sizes(self) -> list[int]:
        return [level.num_nodes for level in self.levels]

    def forward(self, v: Tensor, step: int) -> IndexOutput:
        if self.training:
            self._reservoir.append(v.detach())
        residual, quantized, hard_quantized = v, torch.zeros_like(v), torch.zeros_like(v)
        parent = torch.zeros(len(v), dtype=torch.long, device=v.device)
        outputs, node_embeddings = [], []
        for level in self.levels:
            level.frozen = bool(self.frozen)
            out = level(residual, step, parent)
            quantized = quantized + out.node_embedding
            hard_quantized = hard_quantized + level.codebook[out.hard]
            residual = residual - out.node_embedding
            parent = parent * level.num_nodes + out.hard
            outputs.append(out)
            node_embeddings.append(quantized)
        # The codebook follows its members like online k-means (the VQ codebook loss on the hard path):
        # fitted on the near-uniform early soft assignment instead, every code is pulled to the global mean.
        reconstruction = ((hard_quantized - v.detach()) ** 2).mean()
        return IndexOutput(outputs, node_embeddings, reconstruction)

    @torch.no_grad()
    def assign(self, v: Tensor) -> Tensor:
        """Hard path (N, levels): each level's argmin(distance + price) on the hard residual."""
        return self._hard_paths(v, lambda i, level, residual, parent: level.assign(residual, parent))

    def _hard_paths(self, v: Tensor, choose: Callable[[int, LearnedIndexLevel, Tensor, Tensor], Tensor]) -> Tensor:
        """(N, levels) codes: `choose(i, level, residual, parent)` picks level i's codes on the hard residual."""
        residual, codes = v, []
        parent = torch.zeros(len(v), dtype=torch.long, device=v.device)
        for i, level in enumerate(self.levels):
            code = choose(i, level, residual, parent)
            residual = residual - level.codebook[code]
            parent = parent * level.num_nodes + code
            codes.append(code)
        return torch.stack(codes, dim=1)

    def path_embeddings(self, paths: Tensor) -> list[Tensor]:
        """Hard node embedding per level for given paths: the sum of codes along the prefix."""
        total, out = None, []
        for level_idx, level in enumerate(self.levels):
            code = level.codebook[paths[:, level_idx]]
            total = code if total is None else total + code
            out.append(total)
        return out

    def clear_reservoir(self) -> None:
        """Forget the recent inputs (when what the index reads changes meaning)."""
        self._reservoir.clear()

    @torch.no_grad()
    def seed_with_kmeans(self, seed: int = 0) -> bool:
        """Residual k-means over the recent (warmed-up) item embeddings, level by level: a random codebook on a
        still-moving embedding space collapsed the first LTI; this starts every node on real items."""
        if not self._reservoir:
            return False
        x = torch.cat(list(self._reservoir))
        if len(x) < max(self.sizes):
            return False
        for i, level in enumerate(self.levels):
            if level.config.use_kmeans_init:
                level.codebook.copy_(kmeans(x, level.num_nodes, iterations=15, seed=seed + i))
            level.price.zero_()
            level.distance_scale.zero_()
            code = squared_distances(x, level.codebook).argmin(dim=1)
            x = x - level.codebook[code]
        self.seeded.fill_(True)
        return True

    @torch.no_grad()
    def reseed_dead_codes(self, step: int) -> int:
        """Re-seed each level whose check interval divides `step`."""
        return sum(level.reseed_dead_codes() for level in self.levels if step % level.config.reseed_every == 0)

    @torch.no_grad()
    def after_step(self, step: int) -> int:
        """After the optimiser step, once seeded: EMA code updates, dead-code re-seeding on schedule (returned)."""
        if not bool(self.seeded) or bool(self.frozen):
            return 0
        for level in self.levels:
            level.ema_update()
        return self.reseed_dead_codes(step)

    @torch.no_grad()
    def freeze(self, capacity_factor: float) -> None:
        """Cap the index on recent embeddings (as a build would) and fix codes and prices from now on."""
        self.rebalance(capacity_factor, force=True)
        self.frozen.fill_(True)
        for level in self.levels:
            level.frozen = True

    @torch.no_grad()
    def rebalance(self, capacity_factor: float, generator: torch.Generator | None = None, force: bool = False) -> int:
        """Re-price every level on recent item embeddings so no node holds over capacity_factor x its share,
        after splitting the largest top node for every empty one; returns codes moved. Prices are set afresh by
        an auction (per-batch dual ascent oscillates: in a tight cluster every price step moves all of it)."""
        if not self._reservoir or not (force or any(level.config.use_balance_prices for level in self.levels)):
            return 0
        x = torch.unique(torch.cat(list(self._reservoir)), dim=0)  # a batch stream repeats items
        for level in self.levels:
            level.price.zero_()
        top = self.levels[0]
        moved = 0
        if force or top.config.use_balance_prices:
            code = top.assign(x)
            sizes = torch.bincount(code, minlength=top.num_nodes)
            for empty in torch.nonzero(sizes == 0).flatten().tolist():
                largest = int(sizes.argmax())
                members = torch.nonzero(code == largest).flatten()
                pick = members[torch.randint(len(members), (1,), generator=generator)]
                top.codebook[empty] = x[pick[0]]  # half of the largest node's members now prefer the new code
                code = top.assign(x)
                sizes = torch.bincount(code, minlength=top.num_nodes)
                moved += 1
        self.assign_with_capacity(x, capacity_factor)
        return moved

    @torch.no_grad()
    def assign_with_capacity(
        self, v: Tensor, capacity_factor: float, max_rounds: int = 500, work_budget: float = 5e7
    ) -> Tensor:
        """Hard paths (N, levels) where no node holds over capacity_factor x its level's mean: an auction raises
        over-full nodes' prices, level by level. The prices stay, so `assign` then reproduces these paths: a
        build's layout, training's path and the indexer's path for a new item stay one function.

        A round costs O(N K): rounds are capped at `work_budget` / (N K) (at least 30, at most `max_rounds`),
        and rows the prices have not placed by then go to their cheapest node with room (`_place_overflow`).
        At 10^6 ads and K = 100 a build is then seconds of auction instead of minutes; more of its rows are
        placed (and differ from what `assign` gives them) than with the full round count."""
        caps = [max(1, math.ceil(capacity_factor * len(v) / nodes)) for nodes in accumulate(self.sizes, mul)]

        def auction(i: int, level: LearnedIndexLevel, x: Tensor, parent: Tensor) -> Tensor:
            rounds = int(min(max_rounds, max(30, work_budget / max(1, len(x) * level.num_nodes))))
            return _auction(level, x, parent, caps[i], rounds)

        return self._hard_paths(v, auction)


def _auction(level: LearnedIndexLevel, x: Tensor, parent: Tensor, cap: int, max_rounds: int) -> Tensor:
    """Raise over-full (parent, node) prices until every node holds <= cap rows; returns the codes (N,).

    Each round an over-full node keeps the `cap` rows preferring it most (largest margin over their next best)
    and its price rises just past the next row's margin; prices only rise, so rounds end. Identical rows and
    slow cascades: after `patience` rounds without less overflow the excess goes greedily to its best node
    with room (`_place_overflow`); only those rows differ from `assign`, and the cap holds whatever the input.
    """
    k = level.num_nodes
    dist = level.distances(x)  # (N, K)
    best_overflow, stale, patience = None, 0, 400
    # Each row's two cheapest nodes, kept across rounds: prices only rise, so a row whose best and second best
    # nodes were not re-priced keeps both (every other cost only grew); only the rows touching a re-priced
    # node are recomputed. Same rounds as a full top-2 each round, at a fraction of the cost on a big corpus.
    top2 = torch.topk(dist + level.price[parent], min(2, k), dim=1, largest=False)
    values, indices = top2.values.clone(), top2.indices.clone()  # (N, 2)
    raised = None  # (num_parents * K,) bool: groups re-priced last round
    for _ in range(max_rounds):
        if raised is not None:
            touched = raised[parent.unsqueeze(1) * k + indices].any(dim=1)
            rows_to_update = torch.nonzero(touched).flatten()
            if len(rows_to_update):
                cost = dist[rows_to_update] + level.price[parent[rows_to_update]]
                fresh = torch.topk(cost, min(2, k), dim=1, largest=False)
                values[rows_to_update], indices[rows_to_update] = fresh.values, fresh.indices
        code = indices[:, 0]
        group = parent * k + code
        counts = torch.bincount(group, minlength=level.num_parents * k)
        over = counts > cap
        if not bool(over.any()):
            return code
        overflow = int((counts - cap).clamp(min=0).sum())
        if best_overflow is None or overflow < best_overflow:
            best_overflow, stale = overflow, 0
        else:
            stale += 1
            if stale >= patience:
                break
        rows = torch.nonzero(over[group]).flatten()  # rows of over-full groups, ranked by margin (largest first)
        margin = (values[rows, 1] - values[rows, 0]) if k > 1 else torch.zeros(len(rows))
        order, rank = rank_in_groups(group[rows], -margin)
        pivot = order[rank == cap]  # the first row each over-full group lets go (positions in rows)
        level.price.view(-1).index_add_(0, group[rows[pivot]], margin[pivot] + 1e-4)
        raised = torch.zeros(level.num_parents * k, dtype=torch.bool)
        raised[group[rows[pivot]]] = True
    return _place_overflow(dist + level.price[parent], parent, k, level.num_parents, cap)


def _place_overflow(cost: Tensor, parent: Tensor, k: int, num_parents: int, cap: int) -> Tensor:
    """argmin codes (N,), then every over-full (parent, code) keeps its `cap` cheapest rows and the rest move
    to their cheapest code under the same parent that still has room: rounds over each evicted row's next
    choice, a node taking the cheapest candidates up to its room (vectorised; at most K rounds)."""
    code = cost.argmin(dim=1)
    group = parent * k + code
    counts = torch.bincount(group, minlength=num_parents * k)
    if not bool((counts > cap).any()):
        return code
    order, rank = rank_in_groups(group, cost.gather(1, code.unsqueeze(1)).squeeze(1))
    evicted = order[rank >= cap]  # (E,) rows to move
    counts = torch.bincount(group[order[rank < cap]], minlength=num_parents * k)
    preference = torch.argsort(cost[evicted], dim=1)  # (E, K) each evicted row's codes, cheapest first
    waiting = torch.arange(len(evicted))  # positions in evicted still without a node
    for choice in range(k):
        if len(waiting) == 0:
            break
        rows = evicted[waiting]
        want = preference[waiting, choice]
        wanted = parent[rows] * k + want  # (W,) group each waiting row asks for
        room = (cap - counts).clamp(min=0)
        queue_order, queue_rank = rank_in_groups(wanted, cost[rows, want])
        accepted = queue_order[queue_rank < room[wanted[queue_order]]]  # cheapest first, up to the room
        code[rows[accepted]] = want[accepted]
        counts += torch.bincount(wanted[accepted], minlength=num_parents * k)
        keep = torch.ones(len(waiting), dtype=torch.bool)
        keep[accepted] = False
        waiting = waiting[keep]
    return code
