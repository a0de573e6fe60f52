"""A training-step guard: gradient clipping, and no optimizer step from a non-finite loss or gradient.

`GuardedOptimizer` wraps the real optimizer and is handed to `hsnn.training.train_step` in its
place, so the step itself stays the model package's. Before each step the trainer calls `arm()`,
which copies the model's buffers: a forward pass over a poisoned batch already moved the LTI's
running statistics (usage EMA, distance scale), so skipping the update alone would still leave NaN in
the snapshot. On a non-finite gradient norm the buffers are put back, the gradients dropped, and the
step counted as skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class GuardedOptimizer:
    """Looks like a torch optimizer to `train_step`: `zero_grad()` and `step()`, the rest on `inner`."""

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer, max_grad_norm: float) -> None:
        self.model = model
        self.inner = inner
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else math.inf
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._saved_buffers: list[torch.Tensor] | None = None
        self.skipped = False  # whether the last step was skipped
        self.last_grad_norm = 0.0  # before clipping
        self.clipped = False  # whether the last step's gradients were scaled down

    def arm(self) -> None:
        """Remember the buffers (cheap: running statistics and codebooks, not the embedding tables)."""
        self._saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        self.skipped = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        norm = float(nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, error_if_nonfinite=False))
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            self._restore_buffers()
            self.inner.zero_grad(set_to_none=True)
            self.skipped = True
            return
        self.clipped = norm > self.max_grad_norm
        self.inner.step()

    def _restore_buffers(self) -> None:
        if self._saved_buffers is None:
            return
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), self._saved_buffers, strict=True):
                buffer.copy_(saved)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN or inf (checked before a snapshot is written)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refuse_non_finite(model: nn.Module, on_refusal: Callable[[], object]) -> None:
    """Raise FloatingPointError (after `on_refusal()`, a metric) if the model holds NaN or inf: never snapshot it."""
    poisoned = non_finite_tensors(model)
    if poisoned:
        on_refusal()
        raise FloatingPointError(f"refusing to snapshot non-finite weights: {poisoned[:5]}")
