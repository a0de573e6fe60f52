"""Snapshot store and publisher: atomic versions, checksums, gate, retention, pointer."""

import json
import os

import pytest
import torch

from hsnn.config import preset
from hsnn.monn import MoNN
from streaming.snapshots import DONE_MARKER, CorruptSnapshot, SnapshotStore
from trainer.publisher import Publisher, PublisherSettings
from worlds.planted import SCHEMA


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return MoNN(preset("two_tower"), SCHEMA)


def test_versions_grow_and_manifest_carries_offsets(tmp_path, model):
    store = SnapshotStore(tmp_path)
    first = store.write(model, offsets={"hsnn.impressions": {"0": 120, "1": 80}}, event_time_watermark=1.5e9)
    second = store.write(model, parent=first.version, eval_metrics={"ne": 0.9})
    assert (first.version, second.version) == (1, 2)
    assert store.versions() == [1, 2]
    manifest = store.manifest(1)
    assert manifest.offsets == {"hsnn.impressions": {"0": 120, "1": 80}}
    assert manifest.event_time_watermark == 1.5e9
    assert set(manifest.files) == {"model.safetensors", "model.json"}
    assert store.manifest(2).parent == 1
    assert not any(store.tmp_dir.iterdir())  # staging cleaned up


def test_load_verifies_and_round_trips(tmp_path, model):
    store = SnapshotStore(tmp_path)
    version = store.write(model).version
    loaded, manifest = store.load(version)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert manifest.config["kind"] == "monn"


def test_altered_file_is_refused(tmp_path, model):
    store = SnapshotStore(tmp_path)
    version = store.write(model).version
    weights = store.path(version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot, match=r"model\.safetensors sha256"):
        store.load(version)


def test_incomplete_version_is_invisible(tmp_path, model):
    store = SnapshotStore(tmp_path)
    version = store.write(model).version
    os.remove(store.path(version) / DONE_MARKER)
    assert store.versions() == []
    with pytest.raises(CorruptSnapshot, match="incomplete"):
        store.manifest(version)
    assert store.write(model).version == version + 1  # the number is never reused


def test_publisher_gate_retention_and_pointer(tmp_path, model):
    notified = []
    publisher = Publisher(
        PublisherSettings(store_dir=str(tmp_path), keep_versions=2, max_ne_regression=0.01),
        notify=lambda pointer, manifest: notified.append(pointer.version),
    )
    offsets = {"hsnn.impressions": {"0": 1}}
    first = publisher.publish(model, offsets=offsets, event_time_watermark=None, eval_metrics={"ne": 0.80})
    worse = publisher.publish(model, offsets=offsets, event_time_watermark=None, eval_metrics={"ne": 0.82})
    fine = publisher.publish(model, offsets=offsets, event_time_watermark=None, eval_metrics={"ne": 0.805})
    assert first.promoted and not worse.promoted and fine.promoted
    assert "regresses" in worse.reason
    assert notified == [1, 3]
    assert publisher.store.promoted().version == 3
    assert publisher.store.versions() == [2, 3]  # retention 2
    assert publisher.metrics.rejected._value.get() == 1
    pointer = json.loads((tmp_path / "PROMOTED").read_text())
    assert pointer["version"] == 3


def test_retention_never_deletes_the_promoted_version(tmp_path, model):
    store = SnapshotStore(tmp_path)
    for _ in range(4):
        store.write(model)
    store.promote(1)
    assert store.prune(keep=2) == [2]
    assert store.versions() == [1, 3, 4]


def test_settings_from_env_and_file(tmp_path, monkeypatch):
    config_file = tmp_path / "hsnn.json"
    config_file.write_text(json.dumps({"publisher": {"keep_versions": 7, "store_dir": "/from/file"}}))
    monkeypatch.setenv("HSNN_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("HSNN_PUBLISHER_STORE_DIR", "/from/env")
    settings = PublisherSettings()
    assert settings.keep_versions == 7  # file
    assert settings.store_dir == "/from/env"  # env beats file
