"""Learning To Index: a differentiable codebook per level, stacked residually (RQ-style).

For an input v and codes c_1..c_K: d_k = ||v - c_k||^2 / dim, soft assignment
a = softmax(-alpha * d / mean(d)) (the batch mean makes alpha scale-free), node embedding
c_bar = sum_k a_k c_k, hard node = argmin_k d_k.
Level l+1 quantises what level l left over, r_{l+1} = r_l - c_bar_l, so a node at level l
is the path prefix (k_1 .. k_l) and its embedding is the sum of the codes along it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hsnn.config import LTIConfig


@dataclass
class LevelOutput:
    soft: Tensor  # (N, K) soft assignment
    node_embedding: Tensor  # (N, dim) c_bar
    hard: Tensor  # (N,) argmin node
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


def kmeans(x: Tensor, k: int, iterations: int = 20, seed: int = 0) -> Tensor:
    """Plain Lloyd's k-means with k-means++ seeding; returns (k, dim) centroids."""
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    while len(centroids) < k:
        nearest = squared_distances(x, centroids).amin(dim=1)
        probs = nearest / nearest.sum() if nearest.sum() > 0 else torch.full_like(nearest, 1 / len(x))
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=generator)]])
    for _ in range(iterations):
        assign = squared_distances(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


class LearnedIndexLevel(nn.Module):
    """One codebook with its balance aids (FLOPs regulariser, dead-code re-seeding)."""

    def __init__(self, dim: int, config: LTIConfig):
        super().__init__()
        self.config = config
        self.codebook = nn.Parameter(torch.randn(config.num_nodes, dim) * 0.05)
        self.register_buffer("usage_ema", torch.full((config.num_nodes,), 1.0 / config.num_nodes))
        self.register_buffer("initialized", torch.tensor(not config.use_kmeans_init))
        self._pooled: deque[tuple[Tensor, int]] = deque(maxlen=max(config.flops_pool_batches - 1, 0))
        self._recent_inputs: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.config.num_nodes

    def distances(self, x: Tensor) -> Tensor:
        return squared_distances(x, self.codebook)

    def assign(self, x: Tensor) -> Tensor:
        """Hard node of each row: argmin of the distances (what serving uses)."""
        return self.distances(x).argmin(dim=1)

    def forward(self, x: Tensor, step: int) -> LevelOutput:
        if self.training and not bool(self.initialized):
            self.initialize_with_kmeans(x.detach())
        dist = self.distances(x)
        # Normalise by the batch's mean distance so alpha means the same whatever scale the
        # item tower's embeddings drift to (otherwise the model can undo the schedule).
        scale = dist.mean().detach().clamp(min=1e-12)
        soft = torch.softmax(-temperature(self.config, step) * dist / scale, dim=1)
        hard = dist.argmin(dim=1)
        flops_loss = soft.new_zeros(())
        if self.training:
            balanced = soft
            if self.config.flops_at_target_temperature:
                balanced = torch.softmax(-self.config.alpha_max * dist / scale, dim=1)
            flops_loss = self._flops_regularizer(balanced)
        if self.training:
            self._track_usage(x.detach(), hard)
        return LevelOutput(soft=soft, node_embedding=soft @ self.codebook, hard=hard, flops_loss=flops_loss)

    def _flops_regularizer(self, soft: Tensor) -> Tensor:
        """K * sum_k (mean soft assignment)^2 over this batch and the last M-1 (detached) batches.

        Equals 1 for a perfectly balanced index and K when everything sits in one node.
        """
        if not self.config.use_flops_regularizer:
            return soft.new_zeros(())
        total = soft.sum(dim=0)
        count = soft.shape[0]
        for past_sum, past_count in self._pooled:
            total = total + past_sum
            count += past_count
        if self._pooled.maxlen:
            self._pooled.append((soft.sum(dim=0).detach(), soft.shape[0]))
        mean = total / count
        return self.num_nodes * (mean * mean).sum()

    @torch.no_grad()
    def _track_usage(self, x: Tensor, hard: Tensor) -> None:
        share = torch.bincount(hard, minlength=self.num_nodes).to(x.dtype) / len(hard)
        decay = self.config.usage_ema_decay
        self.usage_ema.mul_(decay).add_(share, alpha=1 - decay)
        self._recent_inputs = x

    @torch.no_grad()
    def dead_nodes(self) -> Tensor:
        return torch.nonzero(self.usage_ema < self.config.dead_threshold / self.num_nodes).flatten()

    @torch.no_grad()
    def reseed_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """Move dead codes onto recent inputs drawn from the busiest nodes; returns how many moved.

        Drawing from crowded nodes splits them, which is what a collapsed index needs.
        """
        if not self.config.use_dead_code_reseed or self._recent_inputs is None:
            return 0
        dead = self.dead_nodes()
        if len(dead) == 0:
            return 0
        x = self._recent_inputs
        weights = self.usage_ema[self.assign(x)].clamp(min=1e-6)
        rows = torch.multinomial(weights, len(dead), replacement=len(dead) > len(x), generator=generator)
        noise = 0.01 * x.std() * torch.randn(len(dead), x.shape[1], generator=generator, dtype=x.dtype)
        self.codebook[dead] = x[rows] + noise
        self.usage_ema[dead] = 1.0 / self.num_nodes
        return len(dead)

    @torch.no_grad()
    def initialize_with_kmeans(self, x: Tensor) -> None:
        if len(x) >= self.num_nodes:
            self.codebook.copy_(kmeans(x, self.num_nodes))
        self.initialized.fill_(True)


@dataclass
class IndexOutput:
    levels: list[LevelOutput]
    node_embeddings: list[Tensor]  # cumulative sum of c_bar up to each level: the level's node embedding
    reconstruction_loss: Tensor


class ResidualIndex(nn.Module):
    """Levels of LTI, each quantising the residual the previous one left."""

    def __init__(self, dim: int, configs: list[LTIConfig]):
        super().__init__()
        self.dim = dim
        self.levels = nn.ModuleList(LearnedIndexLevel(dim, c) for c in configs)

    def forward(self, v: Tensor, step: int) -> IndexOutput:
        residual, quantized = v, torch.zeros_like(v)
        outputs, node_embeddings = [], []
        for level in self.levels:
            out = level(residual, step)
            quantized = quantized + out.node_embedding
            residual = residual - out.node_embedding
            outputs.append(out)
            node_embeddings.append(quantized)
        reconstruction = ((quantized - v) ** 2).mean()
        return IndexOutput(outputs, node_embeddings, reconstruction)

    @torch.no_grad()
    def assign(self, v: Tensor) -> Tensor:
        """Hard path (N, levels): each level's argmin on the hard residual."""
        residual, codes = v, []
        for level in self.levels:
            code = level.assign(residual)
            residual = residual - level.codebook[code]
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

    @torch.no_grad()
    def reseed_dead_codes(self, step: int) -> int:
        """Re-seed each level whose check interval divides `step`."""
        return sum(level.reseed_dead_codes() for level in self.levels if step % level.config.reseed_every == 0)
