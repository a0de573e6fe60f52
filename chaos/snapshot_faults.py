"""E4: every way a snapshot can be corrupt on disk is refused, or readers fall back to what they serve.

Snapshot 1 is promoted and served; snapshot 2 is written, damaged one way, and promoted. The
API's watcher must refuse it (or see no usable pointer) and keep answering with snapshot 1; the
store's reader must raise `CorruptSnapshot` (or not list the version); retention must not be
the cause of a missing index snapshot in the first place.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from chaos.report import ExperimentResult
from chaos.world import BEAMS, StatusCounter, planted_world, request_bodies, tiny_model
from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings
from retrieval_api.state import Catalog, CatalogIndexSource, ServingState
from streaming.snapshots import DONE_MARKER, MANIFEST_FILE, POINTER_FILE, CorruptSnapshot, SnapshotStore
from trainer.publisher import Publisher, PublisherSettings


def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(store: SnapshotStore, version: int, change: Callable[[dict], None]) -> None:
    path = store.path(version) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _point_at(store: SnapshotStore, version: int) -> None:
    (store.root / POINTER_FILE).write_text(json.dumps({"version": version, "promoted_at": time.time()}))


def _weights_byte(store: SnapshotStore) -> None:
    _flip_byte(store.path(2) / "model.safetensors")
    store.promote(2)


def _model_json_byte(store: SnapshotStore) -> None:
    _flip_byte(store.path(2) / "model.json", at=0.3)
    store.promote(2)


def _manifest_offsets(store: SnapshotStore) -> None:
    _edit_manifest(store, 2, lambda m: m["offsets"]["hsnn.impressions"].update({"0": 999_999}))
    _point_at(store, 2)


def _dropped_files_entry(store: SnapshotStore) -> None:
    _edit_manifest(store, 2, lambda m: m["files"].pop("model.safetensors"))
    _point_at(store, 2)


def _truncated_promoted(store: SnapshotStore) -> None:
    store.promote(2)
    pointer = store.root / POINTER_FILE
    pointer.write_bytes(pointer.read_bytes()[:7])


def _missing_done(store: SnapshotStore) -> None:
    (store.path(2) / DONE_MARKER).unlink()
    _point_at(store, 2)


def _pruned_index_snapshot(store: SnapshotStore) -> None:
    store.promote(2)
    shutil.rmtree(store.path(2))


def _load_snapshot_2(store: SnapshotStore) -> object:
    return store.load(2)


CORRUPTIONS: dict[str, tuple[Callable[[SnapshotStore], None], Callable[[SnapshotStore], object]]] = {
    "weights byte": (_weights_byte, _load_snapshot_2),
    "model.json byte": (_model_json_byte, _load_snapshot_2),
    "manifest offsets": (_manifest_offsets, _load_snapshot_2),
    "dropped files entry": (_dropped_files_entry, _load_snapshot_2),
    "truncated PROMOTED": (_truncated_promoted, SnapshotStore.read_pointer),  # snapshot 2 is fine; its pointer not
    "missing DONE": (_missing_done, _load_snapshot_2),
    "pruned index snapshot": (_pruned_index_snapshot, _load_snapshot_2),
}


async def _one(
    corrupt: Callable[[SnapshotStore], None],
    read: Callable[[SnapshotStore], object],
    root: Path,
    catalog: Catalog,
    body: dict,
) -> dict:
    store = SnapshotStore(root)
    store.promote(store.write(tiny_model(0), offsets={"hsnn.impressions": {"0": 10}}).version)
    settings = ApiSettings(beams=BEAMS, max_wait_ms=1, reload_interval_s=3600)
    app = create_app(settings, ServingState(), store=store, index_source=CatalogIndexSource(catalog))
    counter = StatusCounter(app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=counter), base_url="http://api") as client,
    ):
        watcher = app.state.watcher
        await watcher.poll_once()
        store.write(tiny_model(1), offsets={"hsnn.impressions": {"0": 20}}, parent=1)
        corrupt(store)
        outcome = await watcher.poll_once()
        response = await client.post("/retrieve", json=body)
        served = response.json().get("model_version") if response.status_code == 200 else None
    try:
        read(store)
        reader = "loaded"
    except CorruptSnapshot as err:
        reader = f"refused: {str(err).replace(str(root), '<store>')[:90]}"  # no machine paths in the report
    return {
        "watcher": outcome or "no usable pointer",
        "served_model_version": served,
        "status": response.status_code,
        "reader": reader,
        "ok": served == 1 and reader != "loaded" and outcome != "success",
        "5xx": counter.server_errors,
    }


def _retention_keeps_the_index_snapshot(root: Path) -> bool:
    """The prevention side of 'pruned index snapshot': retention never deletes what the index uses."""
    publisher = Publisher(PublisherSettings(store_dir=str(root), keep_versions=1), in_use=lambda: {1})
    for ne in (0.8, 0.8, 0.8):
        publisher.publish(tiny_model(0), offsets={}, event_time_watermark=None, eval_metrics={"ne": ne})
    return 1 in publisher.store.versions()


def run_e4() -> ExperimentResult:
    started = time.monotonic()
    result = ExperimentResult("e4", "snapshot corruption refused or fallen back", "python -m chaos e4")
    world = planted_world()
    catalog = Catalog(item_ids=world.item_ids, items=world.items)
    body = request_bodies(world, 1)[0]
    with tempfile.TemporaryDirectory(prefix="chaos-e4-") as tmp:
        for number, (name, (corrupt, read)) in enumerate(CORRUPTIONS.items()):
            outcome = asyncio.run(_one(corrupt, read, Path(tmp) / str(number), catalog, body))
            result.checks[name] = outcome
            result.runs += 1
            result.faults_injected += 1
            result.http_5xx += outcome.pop("5xx")
        kept = _retention_keeps_the_index_snapshot(Path(tmp) / "retention")
    result.checks["retention keeps the index snapshot"] = kept
    passed = kept and all(c["ok"] for c in result.checks.values() if isinstance(c, dict)) and result.http_5xx == 0
    return result.finish(passed, started)
