"""HSNN: a mixture of MoNNs over a learned hierarchical item index.

Index levels run coarsest first; each has a codebook (LTI) and its own MoNN, and the item
level has the item MoNN. Training scores every impression at every level: the item level
with the item's own features, each index level with the item's (soft) node embedding in
place of the item. An ensemble layer turns the outputs along the item's path into one logit
per level, and every level gets its own supervision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsnn.config import HSNNConfig
from hsnn.features import TrainingBatch
from hsnn.lti import IndexOutput, LevelOutput, ResidualIndex
from hsnn.monn import MoNN


class Ensemble(nn.Module):
    """Output level l = per-task weighted sum of the MoNN outputs z_0..z_l along the path + bias.

    Starts as the identity on z_l, so each level first predicts with its own model.
    """

    def __init__(self, num_outputs: int, num_tasks: int):
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.cat([torch.zeros(level, num_tasks), torch.ones(1, num_tasks)]))
            for level in range(num_outputs)
        )
        self.bias = nn.Parameter(torch.zeros(num_outputs, num_tasks))

    def forward(self, level: int, path_outputs: Tensor) -> Tensor:
        """path_outputs: (P, level + 1, tasks) -> (P, tasks)."""
        return (path_outputs * self.weights[level]).sum(dim=1) + self.bias[level]


@dataclass
class HSNNOutput:
    logits: list[Tensor]  # one (B, tasks) per output level, coarsest first, item level last
    losses: dict[str, Tensor]


class HSNN(nn.Module):
    def __init__(self, config: HSNNConfig):
        super().__init__()
        self.config = config
        schema = config.features
        self.item_model = MoNN(config.item_model, schema)
        index_dim = self.item_model.item_embedding_size
        self.index = ResidualIndex(index_dim, config.levels)
        self.level_models = nn.ModuleList(MoNN(c, schema, item_input_dim=index_dim) for c in config.level_models)
        self.num_outputs = len(config.levels) + 1
        num_tasks = len(schema.tasks)
        self.ensemble = Ensemble(self.num_outputs, num_tasks)
        item_interaction = config.item_model.interaction
        self.aux_projections = nn.ModuleList(
            nn.Linear(c.interaction.num_embed * c.interaction.dim, item_interaction.num_embed * item_interaction.dim)
            if c.interaction is not None and item_interaction is not None
            else nn.Identity()
            for c in config.level_models
        )
        # Post-hoc Platt scaling per output level and task, fitted by `fit_calibration`.
        self.register_buffer("calibration_scale", torch.ones(self.num_outputs, num_tasks))
        self.register_buffer("calibration_shift", torch.zeros(self.num_outputs, num_tasks))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        task_weights = config.task_weights or [1.0] * num_tasks
        self.register_buffer("task_weights", torch.tensor(task_weights), persistent=False)

    @property
    def num_levels(self) -> int:
        return len(self.level_models)

    def index_warmup(self) -> float:
        """Weight of the index losses: linear from 0 to 1 over the warm-up steps."""
        if not self.config.use_index_warmup:
            return 1.0
        return min(1.0, (int(self.step) + 1) / self.config.index_warmup_steps)

    def calibrate(self, level: int, logits: Tensor) -> Tensor:
        return logits * self.calibration_scale[level] + self.calibration_shift[level]

    def forward(self, batch: TrainingBatch) -> HSNNOutput:
        users, items = batch.users, batch.items
        rows = torch.arange(len(batch), device=batch.labels.device)
        item_model = self.item_model
        item_emb = item_model.encode_items(items)
        item_interaction = item_model.encode_interactions(users, items, rows, rows)
        z_item = item_model.pair_logits(item_model.encode_users(users), item_emb, item_interaction)

        index_input = item_emb.flatten(1)
        if not self.config.use_joint_index:
            index_input = index_input.detach()
        if batch.item_paths is not None:
            index_out = self._fixed_index(index_input, batch.item_paths)
        else:
            index_out = self.index(index_input, int(self.step))

        level_z, aux_losses = [], []
        for level, model in enumerate(self.level_models):
            node_emb = model.project_nodes(index_out.node_embeddings[level])
            interaction = model.encode_interactions(users, items, rows, rows)
            level_z.append(model.pair_logits(model.encode_users(users), node_emb, interaction))
            if interaction is not None and item_interaction is not None:
                projected = self.aux_projections[level](interaction.flatten(1))
                aux_losses.append(F.mse_loss(projected, item_interaction.flatten(1).detach()))

        path = torch.stack([*level_z, z_item], dim=1)  # (B, outputs, tasks)
        logits = [self.ensemble(level, path[:, : level + 1]) for level in range(self.num_outputs)]
        return HSNNOutput(logits=logits, losses=self._losses(batch, logits, index_out, aux_losses))

    def _fixed_index(self, v: Tensor, paths: Tensor) -> IndexOutput:
        """Hard, given assignments (an existing hierarchy, k-means, EM): node embeddings are the codes
        along each item's path, still learned by the level losses; no LTI aids apply."""
        node_embeddings = self.index.path_embeddings(paths)
        reconstruction = ((node_embeddings[-1] - v) ** 2).mean()
        zero = v.new_zeros(())
        levels = [
            LevelOutput(soft=v.new_zeros(len(v), 0), node_embedding=emb, hard=paths[:, i], flops_loss=zero)
            for i, emb in enumerate(node_embeddings)
        ]
        return IndexOutput(levels, node_embeddings, reconstruction)

    def _losses(
        self, batch: TrainingBatch, logits: list[Tensor], index_out: IndexOutput, aux_losses: list[Tensor]
    ) -> dict:
        warm = self.index_warmup()
        zero = batch.labels.new_zeros(())
        losses = {"item": self.task_loss(logits[-1], batch.labels)}
        node_losses = [self.task_loss(level_logits, batch.labels) for level_logits in logits[:-1]]
        losses["nodes"] = warm * torch.stack(node_losses).sum()
        losses["flops"] = warm * sum(
            (lvl.flops_loss * c.flops_weight for lvl, c in zip(index_out.levels, self.config.levels, strict=True)), zero
        )
        losses["reconstruction"] = warm * self.config.reconstruction_weight * index_out.reconstruction_loss
        losses["interaction_aux"] = self.config.interaction_aux_weight * sum(aux_losses, zero)
        if batch.soft_labels is not None and self.config.distillation_weight > 0:
            soft = F.binary_cross_entropy_with_logits(logits[-1], batch.soft_labels, reduction="none")
            losses["distillation"] = self.config.distillation_weight * (soft.mean(0) * self.task_weights).sum()
        losses["total"] = sum(losses.values(), zero)
        return losses

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Weighted multi-task log loss."""
        per_task = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
        return (per_task * self.task_weights).sum()

    @torch.no_grad()
    def fit_calibration(self, batch: TrainingBatch, iterations: int = 50) -> None:
        """Platt-scale every output level and task on held-out data (monotone: rankings stay)."""
        was_training = self.training
        self.eval()
        logits = self(batch).logits
        self.train(was_training)
        for level, level_logits in enumerate(logits):
            for task in range(level_logits.shape[1]):
                scale, shift = platt_fit(level_logits[:, task], batch.labels[:, task], iterations)
                self.calibration_scale[level, task] = scale
                self.calibration_shift[level, task] = shift


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
