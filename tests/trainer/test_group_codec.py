"""What trainer ranks exchange round-trips through JSON + safetensors, and nothing else gets through."""

import json
import struct

import pytest
import torch

from hsnn.features import ItemBatch, TrainingBatch, UserBatch
from trainer import group_codec


def batch() -> TrainingBatch:
    users = UserBatch(
        dense=torch.randn(2, 3),
        sparse={"segment": torch.tensor([[1], [2]])},
        history={"item_id": torch.tensor([[4, 0], [5, 6]])},
        history_age=torch.rand(2, 2),
    )
    items = ItemBatch(dense=torch.randn(2, 4), sparse={"item_id": torch.tensor([7, 8])})
    return TrainingBatch(users=users, items=items, labels=torch.tensor([[1.0], [0.0]]), item_keys=torch.tensor([7, 8]))


def test_a_training_batch_and_plain_values_round_trip():
    original = {"template": batch(), "offsets": {0: 12, "1": 3}, "pair": (1, "a"), "none": None, "ratio": 0.5}
    copy = group_codec.decode(group_codec.encode(original))
    assert copy["offsets"] == {0: 12, "1": 3} and copy["pair"] == (1, "a") and copy["none"] is None
    got, want = copy["template"], original["template"]
    assert torch.equal(got.users.history["item_id"], want.users.history["item_id"])
    assert torch.equal(got.items.sparse["item_id"], want.items.sparse["item_id"])
    assert torch.equal(got.labels, want.labels) and got.soft_labels is None


def test_a_type_outside_the_allow_list_is_refused_both_ways():
    class Payload:
        pass

    with pytest.raises(TypeError, match="Payload"):
        group_codec.encode({"x": Payload()})
    with pytest.raises(TypeError, match="keyed"):
        group_codec.encode({(1, 2): "a"})
    forged = json.dumps({"~dataclass": "Popen", "fields": {}}).encode()
    with pytest.raises(KeyError):
        group_codec.decode(struct.pack("<Q", len(forged)) + forged + group_codec.encode(None)[8 + 4 :])


def test_a_truncated_blob_is_an_error():
    blob = group_codec.encode({"a": torch.ones(3)})
    with pytest.raises(ValueError):
        group_codec.decode(blob[:4])
    with pytest.raises(ValueError):
        group_codec.decode(struct.pack("<Q", 10_000) + blob[8:])
