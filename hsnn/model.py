"""HSNN: a mixture of MoNNs over a learned hierarchical item index.

Index levels run coarsest first, each with a codebook (LTI) and its own MoNN; the item level has the item
MoNN. Training scores every impression at every level: the item level with the item's features, an index
level with the item's node embedding (soft early, the hard serving node once the schedule ends). An
ensemble turns the outputs along the path into one logit per level; every level gets log loss plus the
ranking loss beam search and top-k need (node against siblings; clicked item against the batch's items).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsnn.config import FeatureSchema, HSNNConfig
from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from hsnn.lti import IndexOutput, LevelOutput, ResidualIndex, group_means
from hsnn.monn import MoNN, in_batch_softmax_loss


class ProbeUsers(nn.Module):
    """K users drawn once from the training stream, raw features saved with the weights: the axes of the
    score-profile index input (an item's click logits for these users, I2IF included, say who would click it).
    Sparse id lists keep up to `max_ids` per feature (mean-pooled bags ignore the zero padding)."""

    def __init__(self, schema: FeatureSchema, count: int, max_ids: int = 8):
        super().__init__()
        self.sparse_names, self.history_names = sorted(schema.user_sparse), list(schema.history_attributes)
        self.max_ids = max_ids
        self.register_buffer("dense", torch.zeros(count, schema.user_dense_dim))
        for name in self.sparse_names:
            self.register_buffer(f"sparse_{name}", torch.zeros(count, max_ids, dtype=torch.long))
        for name in self.history_names:
            self.register_buffer(f"history_{name}", torch.zeros(count, schema.history_length, dtype=torch.long))
        self.register_buffer("history_age", torch.zeros(count, schema.history_length))
        self.register_buffer("captured", torch.zeros((), dtype=torch.bool))

    def __len__(self) -> int:
        return self.dense.shape[0]

    @torch.no_grad()
    def capture(self, users: UserBatch, seed: int) -> None:
        """Draw the probes from a batch of users (with replacement when the batch is smaller than K)."""
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(users), generator=generator)[: len(self)]
        if len(rows) < len(self):
            rows = torch.randint(len(users), (len(self),), generator=generator)
        chosen = users.select(rows.to(users.dense.device))
        self.dense.copy_(chosen.dense)
        for name in self.sparse_names:
            buffer, ids = getattr(self, f"sparse_{name}").zero_(), chosen.sparse[name][:, : self.max_ids]
            buffer[:, : ids.shape[1]] = ids
        for name in self.history_names:
            getattr(self, f"history_{name}").copy_(chosen.history[name])
        self.history_age.copy_(chosen.history_age)
        self.captured.fill_(True)

    def batch(self) -> UserBatch:
        return UserBatch(
            dense=self.dense,
            sparse={name: getattr(self, f"sparse_{name}") for name in self.sparse_names},
            history={name: getattr(self, f"history_{name}") for name in self.history_names},
            history_age=self.history_age,
        )


class NodeMeans(nn.Module):
    """Per level, one vector per node from its members' item embeddings (`node_input` member_mean / learned).

    A level-l node is a path prefix, key = ((k_1 * K_2 + k_2) * K_3 + ...) as in the serving layout.
    member_mean: a buffer; each training step moves a node's row towards its batch items' mean (a detached
    EMA: it describes the item tower, it does not train it). learned: residual rows like the index's codes,
    a node's vector sums its row and its ancestors'; a row starts at its first members' mean minus the
    parent's vector, then the level losses train it, so a rarely visited leaf starts from its parent. The
    table is saved with the weights and the index layout reads the same rows as training."""

    def __init__(self, codebook_sizes: list[int], dim: int, decay: float, learned: bool = False):
        super().__init__()
        self.codebook_sizes, self.decay, self.learned = list(codebook_sizes), decay, learned
        nodes = 1
        for level, size in enumerate(self.codebook_sizes):
            nodes *= size
            if learned:
                self.register_parameter(f"mean_{level}", nn.Parameter(torch.zeros(nodes, dim)))
            else:
                self.register_buffer(f"mean_{level}", torch.zeros(nodes, dim))
            self.register_buffer(f"seen_{level}", torch.zeros(nodes))  # training rows that reached the node

    def means(self, level: int) -> Tensor:
        return getattr(self, f"mean_{level}")

    def seen(self, level: int) -> Tensor:
        return getattr(self, f"seen_{level}")

    def vectors(self, level: int, keys: Tensor) -> Tensor:
        """(M, dim) node vectors for level-`level` prefix keys (M,): the row, plus the ancestors' in learned mode."""
        total = self.means(level)[keys]
        if self.learned:
            for upper in range(level - 1, -1, -1):
                keys = keys // self.codebook_sizes[upper + 1]
                total = total + self.means(upper)[keys]
        return total

    def keys(self, paths: Tensor) -> list[Tensor]:
        """paths: (N, levels) hard codes -> one (N,) prefix key per level."""
        keys, out = torch.zeros(len(paths), dtype=torch.long, device=paths.device), []
        for level, size in enumerate(self.codebook_sizes):
            keys = keys * size + paths[:, level]
            out.append(keys)
        return out

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every row (when the assignment changed wholesale: the index froze, or new paths were given)."""
        for level in range(len(self.codebook_sizes)):
            self.means(level).data.zero_()
            self.seen(level).zero_()

    @torch.no_grad()
    def update(self, keys: list[Tensor], vectors: Tensor) -> None:
        """vectors: (N, dim) detached item embeddings of the batch rows whose prefix keys are `keys`."""
        for level, key in enumerate(keys):
            means, seen = self.means(level).data, self.seen(level)
            batch_means, counts = group_means(vectors, key, len(seen))  # (nodes, dim), (nodes,)
            hit = counts > 0
            batch_mean, fresh = batch_means[hit], (seen[hit] == 0)[:, None]
            if self.learned:  # rows are only initialised here, as residuals on the parent's vector
                nodes = torch.nonzero(hit).flatten()
                parent = self.vectors(level - 1, nodes // self.codebook_sizes[level]) if level > 0 else 0.0
                means[hit] = torch.where(fresh, batch_mean - parent, means[hit])
            else:
                means[hit] = torch.where(fresh, batch_mean, self.decay * means[hit] + (1 - self.decay) * batch_mean)
            seen += counts


class Ensemble(nn.Module):
    """Output level l = per-task weighted sum of the MoNN outputs z_0..z_l along the path + bias; starts as
    the identity on z_l, so each level first predicts with its own model."""

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


CLICK = 0  # the task retrieval ranks by (the first task of the schema)


class HSNN(nn.Module):
    def __init__(self, config: HSNNConfig):
        super().__init__()
        self.config = config
        schema = config.features
        self.item_model = MoNN(config.item_model, schema)
        profile = config.index_input == "score_profile"
        index_dim = config.probe_users if profile else self.item_model.item_embedding_size
        self.index = ResidualIndex(index_dim, config.levels)
        self.probes = ProbeUsers(schema, config.probe_users) if profile else None
        item_size, sizes = self.item_model.item_embedding_size, [c.num_nodes for c in config.levels]
        member_mean = config.node_input in ("member_mean", "learned")
        node_dim = item_size if member_mean else index_dim
        learned = config.node_input == "learned"
        self.node_means = NodeMeans(sizes, item_size, config.node_mean_decay, learned) if member_mean else None
        # A node has no features of its own (its representative item's I2IF would differ from the
        # training item's), so level models read the user and the node embedding: identical inputs
        # in training and at serving.
        self.level_models = nn.ModuleList(
            MoNN(c.model_copy(update={"interaction": None}), schema, item_input_dim=node_dim)
            for c in config.level_models
        )
        self.num_outputs = len(config.levels) + 1
        num_tasks = len(schema.tasks)
        self.ensemble = Ensemble(self.num_outputs, num_tasks)
        # Post-hoc Platt scaling per output level and task, fitted on held-out data by `bench.platt`.
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
        item_user_emb = item_model.encode_users(users)  # (B, n_user, d)
        item_emb = item_model.encode_items(items)  # (B, n_item, d)
        item_interaction = item_model.encode_interactions(users, items, rows, rows)
        z_item = item_model.pair_logits(item_user_emb, item_emb, item_interaction)  # (B, tasks)

        if self.probes is not None and self.training and not bool(self.probes.captured):
            self.probes.capture(users, seed=int(self.step))
            self.index.clear_reservoir()  # what the index saw so far was not a profile over these users
        detached = self.config.index_stop_gradient or not self.config.use_joint_index
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detached):
            index_input = self.index_vectors(item_emb, items)  # (B, index_dim)
        if batch.item_paths is not None:
            index_out = self._fixed_index(index_input, batch.item_paths)
        else:
            step = int(self.step)
            freeze_at = self.config.index_freeze_step
            seed_at = self.config.index_warmup_steps // 2 if self.config.use_index_warmup else 0  # k-means seeding
            if self.training and freeze_at is not None and step >= freeze_at and not bool(self.index.frozen):
                self.index.freeze(self.config.index_freeze_capacity_factor)
                if self.node_means is not None:
                    self.node_means.reset()  # the capped assignment moves items: node rows start again
            elif self.training and not bool(self.index.seeded) and step >= seed_at:
                if self.index.seed_with_kmeans(seed=step):
                    self.index.rebalance(self.config.training_capacity_factor)
            elif self.training and bool(self.index.seeded) and step % self.config.rebalance_every == 0:
                self.index.rebalance(self.config.training_capacity_factor)
            index_out = self.index(index_input, step)

        node_inputs = index_out.node_embeddings  # per level (B, index_dim), or member means (B, item_size)
        if self.node_means is not None:
            keys = self.node_means.keys(torch.stack([lvl.hard for lvl in index_out.levels], dim=1))
            if self.training:
                self.node_means.update(keys, item_emb.flatten(1).detach())
            node_inputs = [self.node_means.vectors(level, key) for level, key in enumerate(keys)]
        level_z, level_users = [], []
        for level, model in enumerate(self.level_models):
            user_emb = model.encode_users(users)  # (B, n_user, d)
            node_emb = model.project_nodes(node_inputs[level])  # (B, n_item, d)
            level_z.append(model.pair_logits(user_emb, node_emb, None))
            level_users.append(user_emb)

        path = torch.stack([*level_z, z_item], dim=1)  # (B, outputs, tasks)
        logits = [self.ensemble(level, path[:, : level + 1]) for level in range(self.num_outputs)]
        losses = self._losses(batch, logits, index_out, item_emb)
        clicked = torch.nonzero(batch.labels[:, CLICK] > 0.5).flatten()
        if self.config.node_ranking_weight > 0:
            ranking = self._node_ranking_loss(clicked, level_users, index_out, path)
            losses["node_ranking"] = self.index_warmup() * self.config.node_ranking_weight * ranking
        if self.config.retrieval_weight > 0:
            retrieval = in_batch_softmax_loss(
                item_model, batch, item_user_emb, item_emb, clicked, self.config.retrieval_candidates
            )
            losses["retrieval"] = self.config.retrieval_weight * retrieval
        losses["total"] = sum((v for k, v in losses.items() if k != "total"), batch.labels.new_zeros(()))
        return HSNNOutput(logits=logits, losses=losses)

    def index_vectors(self, item_emb: Tensor, items: ItemBatch, chunk: int = 1024) -> Tensor:
        """What the index assigns (N, index_dim) from item embeddings (N, n_item, d), for training, builds and
        the indexer's deltas alike: the flattened embedding, or each probe user's click logit (`ProbeUsers`)."""
        if self.probes is None:
            return item_emb.flatten(1)
        model, probes = self.item_model, self.probes.batch()
        user_emb = model.encode_users(probes)  # (K, n_user, d)
        k = len(self.probes)
        parts = []
        for start in range(0, len(item_emb), chunk):
            rows = torch.arange(start, min(start + chunk, len(item_emb)), device=item_emb.device)
            pair_probe = torch.arange(k, device=item_emb.device).repeat(len(rows))  # (n * K,)
            pair_item = rows.repeat_interleave(k)  # (n * K,) catalogue rows
            interaction = model.encode_interactions(probes, items, pair_probe, pair_item)  # (n * K, n_x, d)
            logits = model.pair_logits(user_emb[pair_probe], item_emb[pair_item], interaction)[:, CLICK]
            parts.append(logits.view(len(rows), k))
        return torch.cat(parts) if parts else item_emb.new_zeros(0, k)

    def node_inputs(self, level: int, keys: Tensor, code_sums: Tensor, member_means: Tensor) -> Tensor:
        """What level `level`'s model reads for the nodes with prefix `keys` (M,): the code sums (M, index_dim),
        or with node rows (`node_input` member_mean / learned) their vectors (M, item_size); a node no
        training item reached takes `member_means`, its members' mean embedding over the catalogue."""
        if self.node_means is None:
            return code_sums
        seen = (self.node_means.seen(level)[keys] > 0).unsqueeze(1)
        return torch.where(seen, self.node_means.vectors(level, keys), member_means)

    def _fixed_index(self, v: Tensor, paths: Tensor) -> IndexOutput:
        """Hard, given assignments (an existing hierarchy, k-means, EM): node embeddings are the codes
        along each item's path, still learned by the level losses; no LTI aids apply."""
        node_embeddings = self.index.path_embeddings(paths)
        reconstruction = ((node_embeddings[-1] - v.detach()) ** 2).mean()
        levels = [
            LevelOutput(soft=v.new_zeros(len(v), 0), node_embedding=emb, hard=paths[:, i], flops_loss=v.new_zeros(()))
            for i, emb in enumerate(node_embeddings)
        ]
        return IndexOutput(levels, node_embeddings, reconstruction)

    def _node_ranking_loss(
        self, clicked: Tensor, level_users: list[Tensor], index_out: IndexOutput, path: Tensor
    ) -> Tensor:
        """Per level, softmax over the clicked item's node and its siblings, target = its node: the comparison
        beam search makes, with candidates scored exactly as serving scores them (ensemble over the path)."""
        total = path.new_zeros(())
        if len(clicked) == 0:
            return total
        num_clicked = len(clicked)
        parent_key = torch.zeros(num_clicked, dtype=torch.long, device=clicked.device)  # (P,)
        for level, model in enumerate(self.level_models):
            codebook = self.index.levels[level].codebook  # (K, dim)
            k = codebook.shape[0]
            sibling_keys = (parent_key.unsqueeze(1) * k + torch.arange(k, device=clicked.device)).flatten()  # (P*K,)
            parent_key = parent_key * k + index_out.levels[level].hard[clicked]
            unused = None
            if self.node_means is not None:  # siblings no training item reached yet do not exist at serving
                candidates = self.node_means.vectors(level, sibling_keys)  # (P * K, item_size)
                unused = (self.node_means.seen(level)[sibling_keys] == 0).view(num_clicked, k)
            else:
                prefix = index_out.node_embeddings[level - 1][clicked].unsqueeze(1) if level else 0.0  # (P, 1, dim)
                candidates = (prefix + codebook.expand(num_clicked, k, -1)).flatten(0, 1)  # (P * K, dim)
            user_emb = level_users[level][clicked].repeat_interleave(k, dim=0)
            z = model.pair_logits(user_emb, model.project_nodes(candidates), None)  # (P * K, tasks)
            ancestors = path[clicked, :level].repeat_interleave(k, dim=0)  # (P * K, level, tasks)
            scores = self.ensemble(level, torch.cat([ancestors, z.unsqueeze(1)], dim=1))[:, CLICK]
            if unused is not None:
                scores = scores.view(num_clicked, k).masked_fill(unused, float("-inf"))
            total = total + F.cross_entropy(scores.view(num_clicked, k), index_out.levels[level].hard[clicked])
        return total

    def _losses(self, batch: TrainingBatch, logits: list[Tensor], index_out: IndexOutput, item_emb: Tensor) -> dict:
        warm = self.index_warmup()
        zero = batch.labels.new_zeros(())
        losses = {"item": self.task_loss(logits[-1], batch.labels)}
        node_losses = [self.task_loss(level_logits, batch.labels) for level_logits in logits[:-1]]
        losses["nodes"] = warm * torch.stack(node_losses).sum()
        losses["flops"] = warm * sum(
            (lvl.flops_loss * c.flops_weight for lvl, c in zip(index_out.levels, self.config.levels, strict=True)), zero
        )
        losses["reconstruction"] = warm * self.config.reconstruction_weight * index_out.reconstruction_loss
        if self.config.commitment_weight > 0 and self.config.use_joint_index:
            gap = item_emb.flatten(1) - index_out.node_embeddings[-1].detach()
            losses["commitment"] = warm * self.config.commitment_weight * (gap**2).mean()
        if batch.soft_labels is not None and self.config.distillation_weight > 0:
            losses["distillation"] = self.config.distillation_weight * self.task_loss(logits[-1], batch.soft_labels)
        return losses

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Weighted multi-task log loss."""
        per_task = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
        return (per_task * self.task_weights).sum()
