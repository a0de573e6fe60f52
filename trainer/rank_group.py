"""A trainer group's membership: which rank owns which partition, the process group and its few collectives.

Kept apart from the trainer so the protocol pieces (rounds, replica checks, the snapshot barrier) and their unit
tests need only a process group, no Kafka and no store. Ranks other than 0 get a `FollowerLease`: rank 0 holds the
store's lease for the whole group.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trainer import group_codec
from trainer.settings import TrainerSettings

log = logging.getLogger("hsnn.trainer")

RANKS_METRIC = "ranks"  # eval_metrics key: ranks that trained the snapshot
REPLICA_MISMATCH_METRIC = "replica_mismatches"  # eval_metrics key: tensors whose digest differed at the barrier
PARTITION_IDS_METRIC = "trained_ids_lines.p"  # + partition: lines of that partition's trained-ids file


def owns(partition: int, rank: int, world_size: int) -> bool:
    """The partition rule: disjoint, covers every partition, and needs no coordination."""
    return partition % world_size == rank


def partition_ids_path(base: str, partition: int) -> str:
    """A group writes one trained-ids file per partition: ownership moves with the world size, partitions do not."""
    return f"{base}.p{partition}"


class RankGroup:
    """This process's membership of the trainer group: the process group and a few typed collectives."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.rank = settings.rank
        self.world_size = settings.world_size
        backend = settings.dist_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        if backend == "nccl":  # code path for GPU machines; CI runs gloo only
            local = int(os.environ.get("LOCAL_RANK", self.rank % max(1, torch.cuda.device_count())))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                init_method=f"tcp://{settings.master_addr}:{settings.master_port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=settings.dist_timeout_s),
            )
        log.info("rank %d of %d joined (%s, %s)", self.rank, self.world_size, backend, self.device)

    def owns(self, partition: int) -> bool:
        return owns(partition, self.rank, self.world_size)

    def exchange(self, values: list[float]) -> Tensor:
        """(world_size, len(values)) float64: every rank's vector, the same on every rank."""
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return torch.stack(out).cpu()

    def all(self, flag: bool) -> bool:
        return bool(self.exchange([1.0 if flag else 0.0]).min() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, through `group_codec` (JSON + safetensors), not torch's pickling collectives."""
        mine = group_codec.to_tensor(group_codec.encode(obj), self.device)  # (bytes,) uint8
        lengths = self.exchange([float(len(mine))])[:, 0].long().tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        padded[: len(mine)] = mine
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [group_codec.decode(group_codec.from_tensor(t[:n])) for t, n in zip(out, lengths, strict=True)]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`src`'s `obj` on every rank, through `group_codec` (JSON + safetensors), never pickle."""
        blob = group_codec.encode(obj) if self.rank == src else b""
        length = torch.tensor([len(blob)], dtype=torch.int64, device=self.device)
        dist.broadcast(length, src=src)
        if self.rank == src:
            data = group_codec.to_tensor(blob, self.device)
        else:
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=src)
        return group_codec.decode(group_codec.from_tensor(data))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class FollowerLease:
    """Ranks other than 0 never write the store: rank 0 holds the lease for the group."""

    epoch = 0

    def acquire(self, wait_s: float = 0.0) -> int:
        return 0

    def renew(self, force: bool = False) -> None:
        return None

    def check(self) -> None:
        return None

    def release(self) -> None:
        return None


def to_device(obj: Any, device: torch.device) -> Any:
    """A batch (dataclasses, dicts, lists of tensors) on `device`; unchanged on CPU."""
    if device.type == "cpu":
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        )
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
