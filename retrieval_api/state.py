"""What the API serves: one model and one index, pinned together and swapped as a unit.

A request (or a micro-batch of requests) reads `ServingState.current()` once and uses only
that `ServingPair` until it answers, so a swap in the middle never mixes a model with an
index built by another one. Swapping is a single reference assignment under a lock; the
old pair stays alive for as long as a batch still holds it.

Where the index comes from is a seam, `IndexSource`: it names the snapshot to serve, loads the
index that belongs to a model version (`load_pair_from_store` pairs the two) and applies index
updates between swaps. `CatalogIndexSource` builds the index here from a catalogue (`CatalogSource`:
planted data, a file) for the store's promoted snapshot; `retrieval_api.redis_index.RedisIndexSource`
reads the one the indexer wrote. `retrieval_api.watcher.SnapshotWatcher` drives either the same way.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch
from hsnn.index import HierarchicalIndex, build_index
from hsnn.model import HSNN
from streaming.snapshots import Pointer, SnapshotStore

log = logging.getLogger("hsnn.retrieval_api")


@dataclass(frozen=True)
class Catalog:
    """The ads to index: raw ids and their features, row for row."""

    item_ids: Tensor
    items: ItemBatch


@dataclass(frozen=True)
class ServingPair:
    """A model and the index built with it. Frozen: a new version is a new pair."""

    model: HSNN
    index: HierarchicalIndex
    model_version: int
    index_version: int
    loaded_at: float = field(default_factory=time.time)
    snapshot_created_at: float | None = None  # the manifest's created_at (None for pairs not loaded from a store)
    event_time_watermark: float | None = None  # the manifest's newest trained event time (None: unknown)

    @property
    def schema(self) -> FeatureSchema:
        return self.model.config.features


class ServingState:
    """Holds the current pair; `current()` is what every request reads, `swap()` what a loader calls."""

    def __init__(self, pair: ServingPair | None = None):
        self._lock = threading.Lock()
        self._pair = pair

    def current(self) -> ServingPair | None:
        return self._pair  # one reference read: never half of an old pair and half of a new one

    def swap(self, new_pair: ServingPair) -> ServingPair | None:
        """Serve `new_pair` from now on; returns the pair it replaced."""
        with self._lock:
            old, self._pair = self._pair, new_pair
        self._log_swap(old, new_pair)
        return old

    def swap_if_current(self, expected: ServingPair, new_pair: ServingPair) -> bool:
        """Serve `new_pair` only if `expected` is still served (an in-place index update must not undo a swap)."""
        with self._lock:
            if self._pair is not expected:
                return False
            self._pair = new_pair
        return True

    @staticmethod
    def _log_swap(old: ServingPair | None, new_pair: ServingPair) -> None:
        log.info(
            "serving model %d with index %d (was %s)",
            new_pair.model_version,
            new_pair.index_version,
            f"{old.model_version}/{old.index_version}" if old else "nothing",
        )


CatalogSource = Callable[[], Catalog]
"""Returns the ads to index now (called once per loaded snapshot, in a worker thread)."""


@runtime_checkable
class IndexSource(Protocol):
    """Where the served pair's index comes from: which snapshot to serve, its index, and updates in between.

    `SnapshotWatcher` is the one caller. Every method but `describe` runs in a worker thread.
    """

    kind: str  # what /status calls the source ("in-process", "redis")

    def wanted(self, store: SnapshotStore) -> Pointer | None:
        """The snapshot to serve now (None: nothing yet); a pointer other than the served one triggers a load."""
        ...

    def load(self, model: HSNN, model_version: int) -> tuple[HierarchicalIndex, int]:
        """The index that belongs to snapshot `model_version` (`model`), and its index version."""
        ...

    def refresh(self, state: ServingState) -> bool:
        """Apply index updates that need no new snapshot to the served pair; True if it changed."""
        ...

    def describe(self, served_index_version: int | None) -> dict[str, Any]:
        """What /status shows about the index (may read the source; raising is reported on the page)."""
        ...


class CatalogIndexSource:
    """Builds the index in process with `hsnn.index.build_index` over the ads a `CatalogSource` returns.

    It serves the store's promoted snapshot. The index version is the model version, since the index is built
    from this model's item tower and codebooks; it never changes between snapshots.
    """

    kind = "in-process"

    def __init__(self, catalog: CatalogSource | Catalog):
        self.catalog_source: CatalogSource = catalog if callable(catalog) else (lambda: catalog)

    def wanted(self, store: SnapshotStore) -> Pointer | None:
        return store.promoted()

    def load(self, model: HSNN, model_version: int) -> tuple[HierarchicalIndex, int]:
        catalog = self.catalog_source()
        started = time.perf_counter()
        device = next(model.parameters()).device
        if device.type == "cpu":
            index = build_index(model, catalog.item_ids, catalog.items)
        else:  # build on a CPU copy (the capacity auction is sequential), serve beside the model
            index = build_index(copy.deepcopy(model).cpu(), catalog.item_ids, catalog.items).to(device)
        elapsed = time.perf_counter() - started
        log.info("built index for snapshot %d over %d ads in %.2fs", model_version, index.num_items, elapsed)
        return index, model_version

    def refresh(self, state: ServingState) -> bool:
        return False

    def describe(self, served_index_version: int | None) -> dict[str, Any]:
        return {}


def load_pair_from_store(
    store: SnapshotStore,
    version: int,
    source: IndexSource | Catalog,
    index_version: int | None = None,
    device: str = "cpu",
) -> ServingPair:
    """Load snapshot `version` (sha256-verified by the store: raises `CorruptSnapshot`) and pair it with its index.

    `source` is an `IndexSource`, or a `Catalog` to build the index from. `index_version`
    overrides the version the source reports.
    """
    model, manifest = store.load(version, device=device)
    if not isinstance(model, HSNN):
        raise TypeError(f"snapshot {version} holds a {type(model).__name__}, the API serves HSNN models")
    if isinstance(source, Catalog):
        source = CatalogIndexSource(source)
    index, source_version = source.load(model, manifest.version)
    return ServingPair(
        model=model,
        index=index,
        model_version=manifest.version,
        index_version=source_version if index_version is None else index_version,
        snapshot_created_at=manifest.created_at,
        event_time_watermark=manifest.event_time_watermark,
    )
