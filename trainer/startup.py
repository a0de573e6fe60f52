"""Where a trainer starts: the store tidied after a killed writer, then the newest snapshot that verifies."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

from hsnn.config import HSNNConfig
from hsnn.model import HSNN
from streaming.snapshots import CorruptSnapshot, Manifest, SnapshotStore

log = logging.getLogger("hsnn.trainer")


def remove_unfinished_snapshots(store: SnapshotStore) -> None:
    """Delete what a killed writer left: staging dirs, and versions renamed into place without DONE.

    Safe because the lease makes this process the store's only writer; readers never see either
    (no DONE marker), but they would pile up with every SIGKILL that lands mid-snapshot.
    """
    for staging in store.tmp_dir.iterdir():
        shutil.rmtree(staging, ignore_errors=True)
        log.warning("removed the unfinished snapshot staging dir %s", staging.name)
    complete = set(store.versions())
    for directory in store.versions_dir.iterdir():
        if directory.name.isdigit() and int(directory.name) not in complete:
            shutil.rmtree(directory, ignore_errors=True)
            log.warning("removed snapshot %s: written without its DONE marker", directory.name)


def load_or_create(
    store: SnapshotStore, hsnn_config: Callable[[], HSNNConfig]
) -> tuple[HSNN, Manifest | None, dict[str, bytes]]:
    """Newest *written* snapshot that verifies (promoted or not): its weights and offsets belong together."""
    for version in reversed(store.versions()):
        try:
            model, manifest, files = store.load_with_files(version)
        except (CorruptSnapshot, ValueError, OSError) as err:
            log.error("snapshot %d unusable, trying the one before: %s", version, err)
            continue
        if not isinstance(model, HSNN):
            raise TypeError(f"snapshot {version} holds a {type(model).__name__}, the trainer trains HSNN")
        wanted = hsnn_config()
        if model.config != wanted:
            log.warning("snapshot %d has a different model config than the settings; continuing it", version)
        log.info("resuming from snapshot %d (offsets %s)", version, manifest.offsets)
        return model, manifest, files
    log.info("no snapshot in %s: starting a fresh model", store.root)
    return HSNN(hsnn_config()), None, {}


def compile_overarches(model: HSNN) -> None:
    """torch.compile every MoNN's over-arch in place (state_dict keys unchanged, so snapshots are as before):
    the over-arch is where a training step spends its FLOPs, and fusing its adds, ReLUs and LayerNorms
    saves their memory traffic. Shapes vary with the batch and the clicked rows, hence dynamic."""
    for monn in [*model.level_models, model.item_model]:
        if monn.overarch is not None:
            monn.overarch.compile(dynamic=True)
