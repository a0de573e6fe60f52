"""The lockstep round: one small all_gather per poll decides how many steps every rank takes and how each rank's
loss is weighted, then each step goes through DDP.

Every rank takes the same number of steps, so DDP's collectives always match: a rank short of data takes a
zero-weight step (eval-mode forward on a batch it kept, loss x 0), and uneven partitions never deadlock. Each
rank's loss is scaled by `rows * world_size / rows of the step over all ranks`, so DDP's averaged gradient is the
gradient of the step's whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from hsnn.features import TrainingBatch
from hsnn.model import HSNN
from trainer.guard import GuardedOptimizer
from trainer.rank_group import RankGroup


@dataclass
class RoundPlan:
    """What every rank agreed on after a poll (identical on all ranks: computed from one all_gather)."""

    sizes: Tensor  # (world_size, max steps) rows each rank trains per step; 0: a zero-weight step
    stop: bool  # some rank wants to stop (SIGTERM): the group stops after this round
    all_stop: bool  # every rank wants to stop (benchmarks: every rank drained its partitions)
    snapshot_due: bool
    records: int  # records consumed this round over all ranks
    template_src: int | None  # rank that sends a batch to ranks that never had one (zero-weight steps need one)

    @property
    def steps(self) -> int:
        per_step = self.sizes.sum(dim=0)
        nonzero = torch.nonzero(per_step > 0).flatten()
        return int(nonzero[-1]) + 1 if len(nonzero) else 0

    def scale(self, rank: int, step: int) -> float:
        """Loss factor of `rank` at `step`: DDP's mean over ranks then equals the mean over the step's rows."""
        total = float(self.sizes[:, step].sum())
        return float(self.sizes[rank, step]) * self.sizes.shape[0] / total if total else 0.0


def plan_round(
    group: RankGroup,
    sizes: list[int],
    max_steps: int,
    *,
    want_stop: bool,
    since_snapshot: int,
    every_events: int,
    time_due: bool,
    has_template: bool,
    records: int,
) -> RoundPlan:
    """One all_gather of a small vector per round; every rank derives the same plan from it."""
    if len(sizes) > max_steps:
        raise ValueError(f"{len(sizes)} steps in one round, at most {max_steps}")
    vector = [float(s) for s in sizes] + [0.0] * (max_steps - len(sizes))
    vector += [float(want_stop), float(since_snapshot), float(time_due), float(has_template), float(records)]
    table = group.exchange(vector)
    step_sizes = table[:, :max_steps]
    stop_col, since_col, time_col, template_col, records_col = (table[:, max_steps + i] for i in range(5))
    plan = RoundPlan(
        sizes=step_sizes,
        stop=bool(stop_col.max() > 0),
        all_stop=bool(stop_col.min() > 0),
        snapshot_due=bool(since_col.sum() >= every_events) or bool(time_col.max() > 0),
        records=int(records_col.sum()),
        template_src=None,
    )
    if plan.steps and bool((template_col == 0).any()):
        havers = torch.nonzero(step_sizes[:, 0] > 0).flatten()
        plan.template_src = int(havers[0])
    return plan


def no_buffer_sync_before_forward() -> dict[str, bool]:
    """DDP's switch for "do not broadcast buffers before every forward" under its current name."""
    import inspect

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def ddp_step(
    ddp: DistributedDataParallel,
    model: HSNN,
    batch: TrainingBatch,
    optimizer: GuardedOptimizer,
    scale: float,
    real: bool,
) -> dict[str, float]:
    """`hsnn.training.train_step` for HSNN through the DDP wrapper, the loss scaled by `scale`.

    A zero-weight step (`real=False`) runs the forward in eval mode: the batch it replays must not move
    running statistics, reservoirs or node means. It still takes part in every collective and the optimizer
    step, so all ranks apply the same averaged gradient.
    """
    model.train(real)
    try:
        optimizer.zero_grad(set_to_none=True)
        losses = ddp(batch).losses
        (losses["total"] * scale).backward()
        optimizer.step()
        stats = {name: float(value.detach()) for name, value in losses.items()}
        model.step += 1
        stats["reseeded"] = float(model.index.after_step(int(model.step)))
    finally:
        model.train(True)
    return stats
