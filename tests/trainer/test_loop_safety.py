"""Loop safety without servers: the train-step guard, the store lease, truncated dead letters, /livez."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

from streaming.events import DEAD_LETTER_RAW_BYTES, IMPRESSIONS_TOPIC, dead_letter_record, read_dead_letter
from streaming.health import Heartbeat, serve_metrics_and_liveness
from trainer.fencing import LeaseHeld, LeaseLost, TrainerLease
from trainer.guard import GuardedOptimizer, non_finite_tensors


class _WithStats(nn.Module):
    """A linear layer with a running-mean buffer that forward updates, like the LTI's usage EMA."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.register_buffer("running", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.running.mul_(0.9).add_(0.1 * x.mean(0))
        return self.linear(x).sum()


def _step(model: _WithStats, guard: GuardedOptimizer, x: torch.Tensor) -> None:
    guard.arm()
    guard.zero_grad()
    model(x).backward()
    guard.step()


def test_guard_skips_a_non_finite_step_and_restores_the_buffers() -> None:
    torch.manual_seed(0)
    model = _WithStats()
    guard = GuardedOptimizer(model, torch.optim.Adam(model.parameters(), lr=0.1), max_grad_norm=1.0)
    _step(model, guard, torch.randn(4, 3))
    assert not guard.skipped
    weights = [p.detach().clone() for p in model.parameters()]
    running = model.running.clone()
    state_steps = [s["step"].clone() for s in guard.inner.state.values()]

    _step(model, guard, torch.tensor([[1e300, 0.0, 0.0]] * 4, dtype=torch.float32))  # inf in float32
    assert guard.skipped and not math.isfinite(guard.last_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert torch.equal(model.running, running)  # the forward's statistics update was undone
    assert [s["step"] for s in guard.inner.state.values()] == state_steps  # Adam did not count it
    assert non_finite_tensors(model) == []

    _step(model, guard, torch.randn(4, 3))  # training goes on
    assert not guard.skipped
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_guard_clips_large_gradients_to_the_limit() -> None:
    model = _WithStats()
    guard = GuardedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_grad_norm=0.5)
    _step(model, guard, torch.full((4, 3), 100.0))
    assert guard.clipped and guard.last_grad_norm > 0.5
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) == pytest.approx(0.5, rel=1e-4)


def test_non_finite_tensors_names_the_poisoned_parameter() -> None:
    model = _WithStats()
    with torch.no_grad():
        model.linear.weight[0, 1] = float("nan")
    assert non_finite_tensors(model) == ["linear.weight"]


# ---------------------------------------------------------------------------------------------- lease
def test_lease_epochs_fence_off_the_older_owner(tmp_path: Path) -> None:
    first = TrainerLease(tmp_path, ttl_s=0.3)
    assert first.acquire() == 1
    first.renew(force=True)
    # a second owner on the same host with a live pid that is not ours is a live owner: refused
    second = TrainerLease(tmp_path, ttl_s=0.3)
    record = second.current()
    assert record is not None and record.epoch == 1
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = tmp_path / "leases" / "000000000001.json"
        path.write_text(path.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {sleeper.pid}'))
        with pytest.raises(LeaseHeld):
            second.acquire(wait_s=0.0)
        time.sleep(0.4)  # not renewed within the TTL: free
        assert second.acquire(wait_s=0.0) == 2
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(LeaseLost):
        first.check()
    with pytest.raises(LeaseLost):
        first.renew(force=True)
    second.check()


def test_lease_of_a_dead_process_on_this_host_is_free_at_once(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = TrainerLease(tmp_path, ttl_s=3600)
    owner.acquire()
    path = tmp_path / "leases" / "000000000001.json"
    path.write_text(path.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {int(dead.stdout)}'))
    assert TrainerLease(tmp_path, ttl_s=3600).acquire(wait_s=0.0) == 2


def test_released_lease_is_free_for_the_next_trainer(tmp_path: Path) -> None:
    owner = TrainerLease(tmp_path, ttl_s=3600)
    owner.acquire()
    owner.release()
    other = TrainerLease(tmp_path, ttl_s=3600)
    other.host = "another-host"  # not the same-host shortcut: the release itself frees it
    assert other.acquire(wait_s=0.0) == 2


# ---------------------------------------------------------------------------------------------- dead letters
def test_a_900_kb_record_becomes_a_small_letter_with_its_hash_and_length() -> None:
    raw = b'{"schema_version": 1, "pad": "' + b"x" * 900_000 + b'"}'
    letter_bytes = dead_letter_record(raw, "not JSON: " + "r" * 5000, IMPRESSIONS_TOPIC, 0, 7, key=b"k" * 100_000)
    assert len(letter_bytes) < 64_000
    letter = read_dead_letter(letter_bytes)
    assert letter.raw_truncated and letter.raw_length == len(raw)
    assert letter.raw == raw[:DEAD_LETTER_RAW_BYTES]
    assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert len(letter.reason) <= 1000 and letter.offset == 7
    small = read_dead_letter(dead_letter_record(b"{bad", "not JSON", IMPRESSIONS_TOPIC, 0, 8))
    assert not small.raw_truncated and small.raw == b"{bad" and small.raw_length == 4


# ---------------------------------------------------------------------------------------------- liveness
def test_livez_follows_the_main_loop_heartbeat() -> None:
    heartbeat = Heartbeat(max_age_s=0.3)
    server = serve_metrics_and_liveness(0, heartbeat, host="127.0.0.1")
    port = server.server_address[1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200 and b"# HELP" in response.read()
        time.sleep(0.5)  # the loop "hangs": no beat
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5)
        assert info.value.code == 503
        heartbeat.beat()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as response:
            assert response.status == 200
    finally:
        server.shutdown()
