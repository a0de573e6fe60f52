"""Platt scaling fitted on held-out data, as the benchmark and the demo do before comparing NE.

The fit writes the model's calibration buffers, which `HSNN.calibrate` applies at every output level
(serving included); the map is monotone, so rankings stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hsnn.features import TrainingBatch
from hsnn.model import HSNN
from hsnn.training import item_logits, predict


def platt_fit(logits: Tensor, labels: Tensor, iterations: int, min_scale: float = 1e-3) -> tuple[float, float]:
    """Fit sigmoid(scale * logit + shift) to the labels by log loss; returns (scale, shift).

    LBFGS with a strong-Wolfe line search: without it, sharply scaled logits and rare positives
    make the plain step overshoot to absurd scales. The map must stay increasing (rankings are
    kept), so when the best scale is below `min_scale` (the logits rank this data no better than
    chance) the scale is pinned there and only the shift is fitted: about the base rate.
    """
    if labels.min() == labels.max():
        return 1.0, 0.0
    logits, labels = logits.detach().double(), labels.detach().double()
    scale, shift = _fit_log_loss(logits, labels, torch.tensor([1.0, 0.0], dtype=torch.float64), iterations)
    if scale < min_scale:
        _, shift = _fit_log_loss(logits, labels, torch.tensor([min_scale, 0.0], dtype=torch.float64), iterations, True)
        scale = min_scale
    return scale, shift


def _fit_log_loss(
    logits: Tensor, labels: Tensor, start: Tensor, iterations: int, shift_only: bool = False
) -> tuple[float, float]:
    scale = start[0].clone().requires_grad_(not shift_only)
    shift = start[1].clone().requires_grad_(True)
    params = [shift] if shift_only else [scale, shift]
    optimizer = torch.optim.LBFGS(params, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits * scale + shift, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(scale.detach()), float(shift.detach())


@torch.no_grad()
def fit_calibration(model: HSNN, batch: TrainingBatch, iterations: int = 50) -> None:
    """Platt-scale every output level and task of `model` on held-out data (monotone: rankings stay)."""
    was_training = model.training
    model.eval()
    logits = model(batch).logits
    model.train(was_training)
    for level, level_logits in enumerate(logits):
        for task in range(level_logits.shape[1]):
            scale, shift = platt_fit(level_logits[:, task], batch.labels[:, task], iterations)
            model.calibration_scale[level, task] = scale
            model.calibration_shift[level, task] = shift


def calibrated_click_probs(model: torch.nn.Module, fit: TrainingBatch, batches: list[TrainingBatch]) -> Tensor:
    """Click probabilities on `batches` after Platt scaling fitted on `fit`, done alike for HSNN and MoNN.

    Comparisons of NE between models are only fair when every model got the same calibration step.
    """
    if isinstance(model, HSNN):
        fit_calibration(model, fit)
        return torch.cat([predict(model, b)[:, 0] for b in batches])
    scale, shift = platt_fit(item_logits(model, fit)[:, 0], fit.labels[:, 0], iterations=50)
    return torch.cat([torch.sigmoid(item_logits(model, b)[:, 0] * scale + shift) for b in batches])
