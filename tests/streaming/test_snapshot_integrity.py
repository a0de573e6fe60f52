"""Snapshot integrity: a self-checksummed manifest, loading exactly the listed files, NaN metrics, the quality gate,
retention that keeps what the index uses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hsnn.config import preset
from hsnn.monn import MoNN
from streaming.snapshots import CorruptSnapshot, Manifest, SnapshotStore, manifest_digest
from trainer.publisher import Publisher, PublisherSettings
from worlds.planted import SCHEMA

OFFSETS = {"hsnn.impressions": {"0": 10}}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return MoNN(preset("two_tower"), SCHEMA)


def publisher_for(tmp_path, **overrides) -> Publisher:
    return Publisher(PublisherSettings(store_dir=str(tmp_path), **overrides))


def publish(publisher: Publisher, model, ne) -> bool:
    metrics = {} if ne is None else {"ne": ne}
    return publisher.publish(model, offsets=OFFSETS, event_time_watermark=None, eval_metrics=metrics).promoted


def edit_manifest(store: SnapshotStore, version: int, change, rechecksum: bool = False) -> None:
    path = store.path(version) / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    if rechecksum:
        data["manifest_sha256"] = manifest_digest(Manifest.model_validate({**data, "manifest_sha256": None}))
    path.write_text(json.dumps(data))


def test_manifest_carries_the_checksum_of_its_own_content(tmp_path, model):
    store = SnapshotStore(tmp_path)
    manifest = store.write(model, offsets=OFFSETS)
    assert manifest.manifest_sha256 == manifest_digest(manifest) and manifest.format_version == 2
    assert store.manifest(1) == manifest


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["offsets"]["hsnn.impressions"].update({"0": 11}),  # would skip or retrain one record
        lambda m: m.update(created_at=m["created_at"] + 1),
        lambda m: m["files"].pop("model.json"),
        lambda m: m.update(manifest_sha256=None),
    ],
)
def test_any_change_to_the_manifest_is_refused(tmp_path, model, change):
    store = SnapshotStore(tmp_path)
    store.write(model, offsets=OFFSETS)
    edit_manifest(store, 1, change)
    with pytest.raises(CorruptSnapshot, match="manifest"):
        store.load(1)


def test_a_manifest_must_list_every_file_the_loader_reads(tmp_path, model):
    store = SnapshotStore(tmp_path)
    store.write(model)
    edit_manifest(store, 1, lambda m: m["files"].pop("model.json"), rechecksum=True)  # consistent, but incomplete
    with pytest.raises(CorruptSnapshot, match=r"does not list model\.json"):
        store.load(1)


def test_listed_names_cannot_leave_the_version_directory(tmp_path, model):
    store = SnapshotStore(tmp_path)
    store.write(model)
    (tmp_path / "outside").write_bytes(b"x")
    edit_manifest(store, 1, lambda m: m["files"].update({"../../outside": "0" * 64}), rechecksum=True)
    with pytest.raises(CorruptSnapshot, match="invalid file name"):
        store.verify(1)


def test_checksummed_but_unloadable_weights_are_corrupt_not_a_crash(tmp_path, model):
    store = SnapshotStore(tmp_path)
    store.write(model)
    weights = store.path(1) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    import hashlib

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    edit_manifest(store, 1, lambda m: m["files"].update({"model.safetensors": digest}), rechecksum=True)
    with pytest.raises(CorruptSnapshot, match="cannot load the model"):
        store.load(1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_are_stored_as_null_and_the_manifest_still_loads(tmp_path, model, value):
    store = SnapshotStore(tmp_path)
    store.write(model, eval_metrics={"ne": value, "events": 40.0})
    assert '"ne": null' in (store.path(1) / "manifest.json").read_text()
    _, manifest = store.load(1)
    assert manifest.eval_metrics == {"ne": None, "events": 40.0}


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_the_gate_never_promotes_without_a_finite_ne(tmp_path, model, bad):
    publisher = publisher_for(tmp_path)
    assert not publish(publisher, model, bad)  # not even the first snapshot, unless configured
    assert publisher.store.promoted() is None
    assert publish(publisher, model, 0.8)
    assert not publish(publisher, model, bad)  # a restart's empty eval buffer or a diverged model
    assert publisher.store.promoted().version == 2


def test_first_snapshot_without_ne_only_when_configured_and_only_the_first(tmp_path, model):
    publisher = publisher_for(tmp_path, promote_first_without_ne=True)
    assert publish(publisher, model, None)
    assert not publish(publisher, model, None)
    assert publish(publisher, model, 0.9)  # the incumbent has no NE: a measured snapshot replaces it
    assert not publish(publisher, model, 0.95)  # from now on, the threshold
    assert publisher.store.promoted().version == 3

    later = publisher_for(tmp_path / "other", promote_first_without_ne=True)
    later.store.write(model)  # something was written before: not the store's first snapshot
    assert not publish(later, model, None)


def test_a_truncated_pointer_is_gated_against_the_newest_snapshot_and_rewritten(tmp_path, model):
    publisher = publisher_for(tmp_path)
    assert publish(publisher, model, 0.8)
    (tmp_path / "PROMOTED").write_text('{"version": 1, "promo')
    assert publisher.store.promoted() is None  # readers keep what they serve
    assert publisher.store.prune(keep=1) == []  # the promoted version cannot be told: nothing is deleted
    assert not publish(publisher, model, 0.9)  # worse than snapshot 1
    assert publish(publisher, model, 0.79)
    assert publisher.store.promoted().version == 3


def test_retention_keeps_the_snapshots_behind_the_current_and_previous_index(tmp_path, model):
    in_use = {1, 2}
    publisher = Publisher(PublisherSettings(store_dir=str(tmp_path), keep_versions=1), in_use=lambda: in_use)
    for ne in (0.8, 0.8, 0.8, 0.8):
        publish(publisher, model, ne)
    assert publisher.store.versions() == [1, 2, 4]  # 3: neither newest, promoted nor used by the index

    def redis_down() -> set[int]:
        raise ConnectionError("redis unreachable")

    publisher.in_use = redis_down
    publish(publisher, model, 0.8)
    assert publisher.store.versions() == [1, 2, 4, 5]  # unknown use: nothing deleted
