"""What the API serves: one model and one index, pinned together and swapped as a unit.

A request (or a micro-batch of requests) reads `ServingState.current()` once and uses only
that `ServingPair` until it answers, so a swap in the middle never mixes a model with an
index built by another one. Swapping is a single reference assignment under a lock; the
old pair stays alive for as long as a batch still holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from torch import Tensor

from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch
from hsnn.index import HierarchicalIndex, build_index
from hsnn.model import HSNN
from hsnn.snapshots import SnapshotStore

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
        log.info(
            "serving model %d with index %d (was %s)",
            new_pair.model_version,
            new_pair.index_version,
            f"{old.model_version}/{old.index_version}" if old else "nothing",
        )
        return old


def load_pair_from_store(
    store: SnapshotStore,
    version: int,
    catalog: Catalog,
    index_version: int | None = None,
    device: str = "cpu",
) -> ServingPair:
    """Load snapshot `version` (sha256-verified by the store) and build its index over `catalog`.

    The catalogue is an argument so that where it comes from (planted data in tests, Redis
    later) stays the caller's business. `index_version` defaults to the model version, since
    the index is built from this model's item tower and codebooks.
    """
    model, manifest = store.load(version, device=device)
    if not isinstance(model, HSNN):
        raise TypeError(f"snapshot {version} holds a {type(model).__name__}, the API serves HSNN models")
    started = time.perf_counter()
    index = build_index(model, catalog.item_ids, catalog.items)
    elapsed = time.perf_counter() - started
    log.info("built index for snapshot %d over %d ads in %.2fs", version, index.num_items, elapsed)
    return ServingPair(
        model=model,
        index=index,
        model_version=manifest.version,
        index_version=manifest.version if index_version is None else index_version,
    )
