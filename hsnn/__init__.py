"""HSNN core: the model, the learned index and layer-wise serving, shared by every service."""

from hsnn.config import FeatureSchema, HSNNConfig, LTIConfig, MoNNConfig, TowerConfig, preset
from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from hsnn.index import HierarchicalIndex, build_index
from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.serving import retrieve, retrieve_exhaustive

__all__ = [
    "HSNN",
    "FeatureSchema",
    "HSNNConfig",
    "HierarchicalIndex",
    "ItemBatch",
    "LTIConfig",
    "MoNN",
    "MoNNConfig",
    "TowerConfig",
    "TrainingBatch",
    "UserBatch",
    "build_index",
    "preset",
    "retrieve",
    "retrieve_exhaustive",
]
