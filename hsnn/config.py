"""Model configuration: plain pydantic models, saved as JSON beside the weights; presets are values, not subclasses."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Unknown keys are an error: a typo in a config must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class FeatureSchema(StrictModel):
    """What the data looks like, for the towers, I2IF and every data source. Sparse ids are positive, 0 is
    missing / padding; ids are hashed into each feature's bucket count, so raw ids of any size can be fed."""

    user_dense_dim: int = Field(4, ge=0)
    user_sparse: dict[str, int] = Field(default_factory=lambda: {"segment": 64, "age_bucket": 16})
    item_dense_dim: int = Field(4, ge=0)
    item_sparse: dict[str, int] = Field(
        default_factory=lambda: {"item_id": 50_000, "advertiser": 5_000, "campaign": 20_000, "category": 512}
    )
    history_attributes: list[str] = Field(default_factory=lambda: ["item_id", "advertiser", "category"])
    interaction_attributes: list[str] = Field(default_factory=lambda: ["advertiser", "category"])
    history_length: int = Field(32, ge=1)
    recency_scale: float = Field(24.0, gt=0, description="I2IF recency weight is exp(-age / recency_scale).")
    tasks: list[str] = Field(default_factory=lambda: ["click", "conversion"])

    @model_validator(mode="after")
    def _attributes_exist(self) -> FeatureSchema:
        for name in self.history_attributes + self.interaction_attributes:
            if name not in self.item_sparse:
                raise ValueError(f"attribute {name!r} is not an item sparse feature {sorted(self.item_sparse)}")
        missing = set(self.interaction_attributes) - set(self.history_attributes)
        if missing:
            raise ValueError(f"interaction attributes {sorted(missing)} must also be history attributes")
        if not self.tasks:
            raise ValueError("at least one task is needed")
        return self


class TowerConfig(StrictModel):
    """One tower: embedding bags + MLP (implicit interactions) + attentional FM (explicit pairs)."""

    num_embed: int = Field(1, ge=1)
    dim: int = Field(32, ge=1)
    sparse_dim: int = Field(16, ge=1, description="Width of each sparse feature's embedding bag.")
    hidden: list[int] = Field(default_factory=lambda: [64])
    use_afm: bool = True
    afm_attention_dim: int = Field(16, ge=1)


class MoNNConfig(StrictModel):
    """A Modular Neural Network. `dot_product=True` is the Two Tower model (no interaction tower)."""

    name: str = "monn_small"
    user: TowerConfig
    item: TowerConfig
    interaction: TowerConfig | None = None
    dot_product: bool = False
    overarch_layers: int = Field(1, ge=0)
    overarch_hidden: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _two_tower_shape(self) -> MoNNConfig:
        if self.dot_product:
            if self.interaction is not None:
                raise ValueError("a dot-product (Two Tower) model has no interaction tower")
            if self.user.num_embed * self.user.dim != self.item.num_embed * self.item.dim:
                raise ValueError("Two Tower needs user and item embeddings of the same total size")
        return self


_Side = tuple[int, list[int]]  # a tower's (num_embed, MLP widths)


def _monn(
    name: str, dim: int, user: _Side, item: _Side, interaction_hidden: int, layers: int, hidden: int
) -> MoNNConfig:
    """Towers of one width `dim`, one interaction embedding, `layers` over-arch layers of width `hidden`."""
    return MoNNConfig(
        name=name,
        user=TowerConfig(num_embed=user[0], dim=dim, hidden=user[1]),
        item=TowerConfig(num_embed=item[0], dim=dim, hidden=item[1]),
        interaction=TowerConfig(num_embed=1, dim=dim, hidden=[interaction_hidden], sparse_dim=8),
        overarch_layers=layers,
        overarch_hidden=hidden,
    )


# Shapes follow the HSNN paper's Table 5 (num_embed x dim per tower); MLP widths are ours,
# sized so the suite and the benchmarks run on a 2-core CPU.
PRESETS: dict[str, MoNNConfig] = {
    "two_tower": MoNNConfig(
        name="two_tower", user=TowerConfig(dim=40, hidden=[64]), item=TowerConfig(dim=40, hidden=[64]), dot_product=True
    ),
    "monn_small": _monn("monn_small", 40, (8, [128]), (1, [64]), interaction_hidden=32, layers=1, hidden=64),
    "monn_medium": _monn("monn_medium", 48, (10, [256]), (4, [128]), interaction_hidden=64, layers=2, hidden=128),
    "monn_large": _monn("monn_large", 48, (30, [256, 256]), (8, [128]), interaction_hidden=64, layers=3, hidden=256),
}


def preset(name: str) -> MoNNConfig:
    """A fresh copy of a named preset (callers may mutate it)."""
    if name not in PRESETS:
        raise KeyError(f"unknown MoNN preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].model_copy(deep=True)


class LTIConfig(StrictModel):
    """Learning To Index for one level. Every training aid has its own switch for ablations."""

    num_nodes: int = Field(16, ge=2)
    alpha_max: float = Field(20.0, gt=0)
    alpha_min: float = Field(0.5, ge=0, description="Floor of the schedule so step 0 is not uniform.")
    use_temperature_schedule: bool = True
    schedule_steps: int = Field(2000, ge=1, description="T in alpha_max * (t / T)^p.")
    schedule_power: float = Field(2.0, gt=0, description="p in alpha_max * (t / T)^p.")
    use_flops_regularizer: bool = False
    flops_weight: float = Field(0.1, ge=0)
    flops_pool_batches: int = Field(8, ge=1, description="M: soft assignments pooled over the last M batches.")
    flops_at_target_temperature: bool = Field(
        False,
        description="Balance the assignment at alpha_max (what serving's argmin approaches) instead of at the "
        "scheduled alpha, where early soft assignments look balanced even when the hard ones are collapsed.",
    )
    use_balance_prices: bool = Field(
        False,
        description="Every rebalance_every steps an auction on recent item embeddings prices the nodes so none "
        "holds more than capacity_factor x its share (empty top nodes first split the largest); hard assignment "
        "is argmin(distance + price) in training and serving. Off: re-pricing moved the level models' targets and "
        "cost more node quality than it bought (docs/benchmarks.md); the build-time cap balances either way.",
    )
    use_dead_code_reseed: bool = True
    usage_ema_decay: float = Field(0.95, gt=0, lt=1)
    dead_threshold: float = Field(0.1, ge=0, description="Dead when EMA usage < threshold / num_nodes.")
    reseed_every: int = Field(50, ge=1, description="Check for dead codes every this many steps.")
    use_kmeans_init: bool = Field(True, description="Seed codes by k-means on recent item embeddings after warm-up.")
    use_ema_codebook: bool = Field(
        True,
        description="VQ-VAE's EMA codebook: after every step code <- d * code + (1 - d) * mean of its batch inputs, "
        "so codes keep up with a training item tower (by gradient alone they were stranded and the index collapsed).",
    )
    ema_decay: float = Field(0.9, gt=0, lt=1, description="d in the EMA codebook update.")
    node_losses_move_codes: bool = Field(True, description="Level losses move codes via c_bar (the paper); False: no.")
    use_hard_assignment: bool = Field(
        True,
        description="From alpha_max on, the node embedding is the hard code (soft gradient passed straight "
        "through): training sees exactly the serving path.",
    )


class HSNNConfig(StrictModel):
    """HSNN: one LTI level + one MoNN per index level (coarsest first), then the item-level MoNN."""

    features: FeatureSchema = Field(default_factory=FeatureSchema)
    levels: list[LTIConfig] = Field(default_factory=lambda: [LTIConfig(num_nodes=16), LTIConfig(num_nodes=8)])
    level_models: list[MoNNConfig] = Field(
        default_factory=lambda: [preset("monn_large"), preset("monn_medium")],
        description="One MoNN per index level, coarsest first; no interaction tower (a node has no features).",
    )
    item_model: MoNNConfig = Field(default_factory=lambda: preset("monn_small"))
    task_weights: list[float] | None = Field(None, description="Weight per task; default all 1.")
    use_index_warmup: bool = True
    index_warmup_steps: int = Field(500, ge=1, description="Linear warm-up of the index-loss weight.")
    reconstruction_weight: float = Field(1.0, ge=0)
    rebalance_every: int = Field(50, ge=1, description="Steps between auctions that re-price the index nodes.")
    training_capacity_factor: float = Field(
        1.5, ge=1.0, description="Largest node / mean node allowed by the training-time auctions."
    )
    index_freeze_step: int | None = Field(
        None,
        ge=1,
        description="From this step one auction caps the index as a build would, then codes and prices stay: the "
        "level models train on exactly the index serving walks. None: never.",
    )
    index_freeze_capacity_factor: float = Field(2.0, ge=1.0, description="The cap applied when the index freezes.")
    commitment_weight: float = Field(
        0.0, ge=0, description="VQ commitment, item embeddings towards their codes (reaches a stop-gradient tower)."
    )
    distillation_weight: float = Field(0.0, ge=0, description="Log loss on soft labels, when a batch has them.")
    use_joint_index: bool = Field(
        True, description="False stops index/level gradients reaching the item tower (separate index learning)."
    )
    index_input: Literal["item_embedding", "score_profile"] = Field(
        "item_embedding",
        description="What the index clusters: the item tower's output, or the item model's click logits for "
        "probe_users users saved with the weights (items the same users click share nodes; probe_users scores/item).",
    )
    probe_users: int = Field(128, ge=2, description="Probe users of the score_profile index input (its dimension).")
    node_input: Literal["code", "member_mean", "learned"] = Field(
        "code",
        description="What a level model reads for a node: the sum of codes on its path (index input space); its "
        "members' EMA mean item embedding, as the item model sees them whatever the index clusters; or learned "
        "residual rows started at that mean (`NodeMeans`).",
    )
    node_mean_decay: float = Field(0.9, gt=0, lt=1, description="EMA decay of the member_mean node input.")
    index_stop_gradient: bool = Field(True, description="VQ-style: index losses reach the item tower by commitment")
    retrieval_weight: float = Field(
        1.0, ge=0, description="In-batch logQ-corrected softmax for every clicked row: what ranking many items needs."
    )
    retrieval_candidates: int = Field(128, ge=2, description="Most distinct batch items in a clicked row's softmax.")
    node_ranking_weight: float = Field(1.0, ge=0, description="Softmax of a clicked node against its siblings.")

    @model_validator(mode="after")
    def _one_model_per_level(self) -> HSNNConfig:
        if len(self.levels) != len(self.level_models):
            raise ValueError(f"{len(self.levels)} index levels but {len(self.level_models)} level models")
        if not self.levels:
            raise ValueError("HSNN needs at least one index level")
        if self.task_weights is not None and len(self.task_weights) != len(self.features.tasks):
            raise ValueError("task_weights needs one weight per task")
        return self
