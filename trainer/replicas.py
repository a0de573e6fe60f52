"""Replica consistency: every rank's parameters and buffers stay identical although HSNN changes state DDP does
not see (codebooks' k-means seeding, EMA and re-seeding, LTI running statistics, node means, all under no_grad).

Each step compares cheap per-tensor fingerprints across ranks and re-broadcasts rank 0's copy where they differ;
the snapshot barrier compares exact digests. `dump_replica` writes one rank's tensors to compare from outside.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.rank_group import RankGroup


class ReplicaSync:
    """Keeps every rank's parameters and buffers identical: cheap fingerprints each step, a digest at snapshots."""

    def __init__(self, model: nn.Module) -> None:
        self.named = [*model.named_parameters(), *model.named_buffers()]
        largest = max((t.numel() for _, t in self.named), default=1)
        # Position weights: a plain sum misses counts and shares that moved between slots (their total is the batch).
        self.weights = torch.frac(torch.arange(largest, dtype=torch.float64) * 0.6180339887498949) + 0.5

    def fingerprints(self) -> Tensor:
        """Two float64 numbers per tensor: its sum and a position-weighted sum (computed where the tensor lives)."""
        parts: list[Tensor] = []
        for _, t in self.named:
            if self.weights.device != t.device:
                self.weights = self.weights.to(t.device)
            flat = t.detach().reshape(-1).to(torch.float64)
            parts.append(torch.stack([flat.sum(), torch.dot(flat, self.weights[: flat.numel()])]))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def repair(self, group: RankGroup) -> list[str]:
        """Broadcast rank 0's copy of every tensor whose fingerprint differs on some rank; returns their names."""
        mine = self.fingerprints().to(group.device)
        both = torch.cat([mine, -mine])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        n = len(mine)
        unequal = (both[:n] != -both[n:]).cpu().reshape(-1, 2).any(dim=1)  # max != min (NaN always differs)
        differ = torch.nonzero(unequal).flatten().tolist()
        with torch.no_grad():
            for i in differ:
                dist.broadcast(self.named[i][1].data, src=0)
        return [self.named[i][0] for i in differ]

    def digests(self) -> list[str]:
        """sha256 of each tensor's bytes: equal lists mean bit-identical replicas (-0.0 and 0.0 included)."""
        return [
            hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for _, t in self.named
        ]

    def broadcast(self, names: Iterable[str]) -> None:
        wanted = set(names)
        with torch.no_grad():
            for name, t in self.named:
                if name in wanted:
                    dist.broadcast(t.data, src=0)


def dump_replica(model: nn.Module, directory: Path, rank: int) -> Path:
    """Debug (`replica_dump_dir`): this rank's parameters and buffers, to compare replicas from outside."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    path = directory / f"rank{rank}.safetensors"
    save_file(tensors, str(path))
    return path
