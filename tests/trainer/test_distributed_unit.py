"""The lockstep pieces of a trainer group without Kafka: partition rule, launcher argv, settings from torch's
env, and two gloo processes taking uneven steps (a rank with no data) to bit-identical replicas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from hsnn.model import HSNN
from hsnn.training import make_optimizer, train_step
from trainer.guard import GuardedOptimizer
from trainer.launcher import free_port, strip_ranks
from trainer.rank_group import RankGroup, owns
from trainer.replicas import ReplicaSync
from trainer.rounds import RoundPlan, ddp_step, no_buffer_sync_before_forward, plan_round
from trainer.settings import TrainerSettings
from worlds.planted import make_batches, make_world, tiny_hsnn_config


def test_partitions_are_split_disjointly_and_completely() -> None:
    for world_size in (1, 2, 3, 5):
        owners = [[r for r in range(world_size) if owns(p, r, world_size)] for p in range(12)]
        assert all(len(o) == 1 for o in owners)


def test_a_round_takes_the_longest_rank_s_steps_and_weights_rows_globally() -> None:
    plan = RoundPlan(
        sizes=torch.tensor([[512.0, 512.0, 6.0], [512.0, 0.0, 0.0]]),
        stop=False,
        all_stop=False,
        snapshot_due=False,
        records=0,
        template_src=None,
    )
    assert plan.steps == 3
    assert plan.scale(0, 0) == plan.scale(1, 0) == 1.0  # equal shares: DDP's plain mean
    assert (plan.scale(0, 1), plan.scale(1, 1)) == (2.0, 0.0)  # rank 1 takes a zero-weight step
    assert plan.scale(0, 2) == 2.0  # a 6-row step alone is a whole step (the short-last-step effect)
    empty = RoundPlan(torch.zeros(2, 3), False, False, False, 0, None)
    assert empty.steps == 0


def test_launcher_passes_everything_but_ranks_to_the_ranks() -> None:
    assert strip_ranks(["--ranks", "2", "--store-dir", "s", "--ranks=3", "--batch-size", "8"]) == [
        "--store-dir",
        "s",
        "--batch-size",
        "8",
    ]


def test_torch_launcher_env_fills_rank_and_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "12345")
    settings = TrainerSettings()
    assert (settings.rank, settings.world_size, settings.master_port) == (1, 2, 12345)
    assert TrainerSettings(rank=0).rank == 0  # explicit settings win
    monkeypatch.setenv("HSNN_TRAINER_WORLD_SIZE", "4")
    assert TrainerSettings().world_size == 4
    monkeypatch.setenv("RANK", "7")
    with pytest.raises(ValueError, match="outside a group"):
        TrainerSettings()


def _model() -> tuple[HSNN, GuardedOptimizer]:
    torch.manual_seed(0)
    model = HSNN(tiny_hsnn_config())
    return model, GuardedOptimizer(model, make_optimizer(model, 3e-3), 10.0)


def _state(model: HSNN) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone().contiguous() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    group = RankGroup(TrainerSettings(rank=rank, world_size=2, master_port=port, dist_backend="gloo"))
    try:
        model, optimizer = _model()
        ddp = DistributedDataParallel(model, find_unused_parameters=True, **no_buffer_sync_before_forward())
        replicas = ReplicaSync(model)
        batches = make_batches(make_world(), 5, 64, seed=1, users_per_batch=32)

        def round_(mine: list, template: object) -> tuple[int, object]:
            plan = plan_round(
                group,
                [len(b) for b in mine],
                4,
                want_stop=False,
                since_snapshot=0,
                every_events=10**9,
                time_due=False,
                has_template=template is not None or bool(mine),
                records=0,
            )
            if plan.template_src is not None:
                got = group.broadcast_object(mine[0] if rank == plan.template_src else None, src=plan.template_src)
                template = template if template is not None or mine else got
            for step in range(plan.steps):
                batch = mine[step] if step < len(mine) else None
                template = batch if batch is not None else template
                optimizer.arm()
                ddp_step(ddp, model, template, optimizer, plan.scale(rank, step), real=batch is not None)
                replicas.repair(group)
            return plan.steps, template

        # Round 1: rank 0 has three batches, rank 1 none (and no batch to replay yet: it gets one).
        steps, template = round_(batches[:3] if rank == 0 else [], None)
        assert steps == 3
        save_file(_state(model), f"{out}/a{rank}.safetensors")
        # Round 2: uneven the other way, both with data.
        steps, template = round_(batches[3:4] if rank == 0 else batches[4:5] * 2, template)
        assert steps == 2
        save_file(_state(model), f"{out}/b{rank}.safetensors")
        # A difference the gradient never sees (a share moved between slots: the same sum) is repaired.
        if rank == 1:
            usage = model.index.levels[0].usage_ema
            usage[0] += 0.25
            usage[1] -= 0.25
        assert replicas.repair(group) == ["index.levels.0.usage_ema"]
        save_file(_state(model), f"{out}/c{rank}.safetensors")
    finally:
        group.close()


def test_two_gloo_ranks_with_uneven_batches_stay_identical_and_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    a0, a1 = (load_file(str(tmp_path / f"a{r}.safetensors")) for r in (0, 1))
    b0, b1 = (load_file(str(tmp_path / f"b{r}.safetensors")) for r in (0, 1))
    c0, c1 = (load_file(str(tmp_path / f"c{r}.safetensors")) for r in (0, 1))
    for x, y in ((a0, a1), (b0, b1), (c0, c1)):
        assert [k for k in x if not torch.equal(x[k], y[k])] == []  # bit-identical replicas
    assert int(b0["step"]) == 5  # 3 + 2 lockstep steps, zero-weight ones included

    # Rank 1's zero-weight steps add nothing: the group's weights are one process's on rank 0's batches.
    model, optimizer = _model()
    for batch in make_batches(make_world(), 5, 64, seed=1, users_per_batch=32)[:3]:
        optimizer.arm()
        train_step(model, batch, optimizer)  # type: ignore[arg-type] (guarded optimizer)
    single = _state(model)
    worst = max(float((single[k].double() - a0[k].double()).abs().max()) for k in single if single[k].numel())
    assert worst < 1e-5 and not math.isnan(worst)
