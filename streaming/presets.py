"""The small model preset (`model_preset="tiny"`) and the feature schema it reads.

`hsnn.config.PRESETS` holds the paper's shapes; this one is for tests, the demo and smoke runs: a
two-level HSNN whose MoNNs have one hidden layer of 32. Its schema is the one the planted world
(`worlds.planted`) draws features for, so services can name the preset without importing a world.
"""

from __future__ import annotations

from hsnn.config import FeatureSchema, HSNNConfig, LTIConfig, MoNNConfig, TowerConfig

TINY_SCHEMA = FeatureSchema(
    user_dense_dim=2,
    user_sparse={"segment": 32, "age_bucket": 8},
    item_dense_dim=4,
    item_sparse={"item_id": 4096, "advertiser": 512, "category": 64},
    history_attributes=["item_id", "advertiser", "category"],
    interaction_attributes=["advertiser", "category"],
    history_length=8,
    recency_scale=24.0,
    tasks=["click", "conversion"],
)


def tiny_monn(name: str = "tiny", interaction: bool = True, dim: int = 16, dot_product: bool = False) -> MoNNConfig:
    tower = TowerConfig(num_embed=2, dim=dim, sparse_dim=8, hidden=[32], afm_attention_dim=8)
    item = TowerConfig(
        num_embed=1 if dot_product else 2,
        dim=dim * 2 if dot_product else dim,
        sparse_dim=8,
        hidden=[32],
        afm_attention_dim=8,
    )
    if dot_product:
        tower = TowerConfig(num_embed=1, dim=dim * 2, sparse_dim=8, hidden=[32], afm_attention_dim=8)
    return MoNNConfig(
        name=name,
        user=tower,
        item=item,
        interaction=TowerConfig(num_embed=1, dim=dim, sparse_dim=8, hidden=[16], afm_attention_dim=8)
        if interaction
        else None,
        dot_product=dot_product,
        overarch_layers=1,
        overarch_hidden=32,
    )


def tiny_hsnn_config(num_nodes: tuple[int, ...] = (8, 4), **lti_overrides) -> HSNNConfig:
    lti = {"schedule_steps": 200, "reseed_every": 20, **lti_overrides}
    return HSNNConfig(
        features=TINY_SCHEMA,
        levels=[LTIConfig(num_nodes=n, **lti) for n in num_nodes],
        level_models=[tiny_monn(f"level{i}") for i in range(len(num_nodes))],
        item_model=tiny_monn("item"),
        index_warmup_steps=50,
        retrieval_candidates=32,  # the tests' small batches: keep the softmax cheap
    )
