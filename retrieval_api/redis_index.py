"""Serve the indexer's index from Redis: its pointer names the (model, index) pair, its delta the item churn.

The indexer writes index version v for snapshot m and flips `index:current` to v. This `IndexSource`
tells the `SnapshotWatcher` to serve snapshot m (`wanted`), loads index v from Redis for it (`load`; the
watcher loads m from the snapshot store, sha256-verified), and between snapshots applies v's delta list
(`refresh`) so created ads become retrievable and expired ones disappear within one poll. A rebuild for
the same snapshot (a new v, same m) is picked up by `refresh` too.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from hsnn.index import HierarchicalIndex
from hsnn.model import HSNN
from retrieval_api.state import ServingState
from streaming import index_store
from streaming.snapshots import Pointer, SnapshotStore

log = logging.getLogger("hsnn.retrieval_api")


class IndexNotReady(RuntimeError):
    """Redis has no index built from the snapshot the watcher asked for (yet)."""


class RedisIndexSource:
    """The index the indexer keeps in Redis under `prefix` (one client, shared with /status)."""

    kind = "redis"

    def __init__(self, redis, prefix: str = index_store.DEFAULT_PREFIX):
        self.redis, self.prefix = redis, prefix
        self._lock = threading.Lock()
        self._view: index_store.IndexView | None = None  # the view behind the served pair

    def wanted(self, store: SnapshotStore) -> Pointer | None:
        """The snapshot the current Redis index was built from (the store's own pointer is the indexer's input)."""
        version = index_store.current_version(self.redis, self.prefix)
        if version is None:
            return None
        meta = index_store.read_meta(self.redis, version, self.prefix)
        return Pointer(version=int(meta["model_version"]), promoted_at=float(version))

    def load(self, model: HSNN, model_version: int) -> tuple[HierarchicalIndex, int]:
        """The current Redis index, which must have been built from snapshot `model_version`."""
        view = index_store.load_index(self.redis, model, prefix=self.prefix)
        if int(view.meta["model_version"]) != model_version:
            raise IndexNotReady(f"Redis index {view.version} was built from snapshot {view.meta['model_version']}")
        with self._lock:
            self._view = view
        return view.index, view.version

    def refresh(self, state: ServingState) -> bool:
        """Apply new delta entries (or a same-snapshot rebuild) to the served pair; True if it changed."""
        pair, view = state.current(), self._view
        if pair is None or view is None or view.version != pair.index_version:
            return False
        current = index_store.current_version(self.redis, self.prefix)
        if current is not None and current != view.version:
            meta = index_store.read_meta(self.redis, current, self.prefix)
            if int(meta["model_version"]) != pair.model_version:
                return False  # a new snapshot: the watcher loads that pair
            fresh = index_store.load_index(self.redis, pair.model, current, prefix=self.prefix)
        else:
            fresh = index_store.refresh(self.redis, view, pair.model, prefix=self.prefix)
            if fresh is view:
                return False
        new_pair = dataclasses.replace(pair, index=fresh.index, index_version=fresh.version)
        if not state.swap_if_current(pair, new_pair):
            return False
        with self._lock:
            self._view = fresh
        log.debug("index %d now at delta %d", fresh.version, fresh.delta_seq)
        return True

    def describe(self, served_index_version: int | None) -> dict[str, Any]:
        """The current Redis index version, its snapshot and age, and when the served version was built."""
        current = index_store.current_version(self.redis, self.prefix)
        facts: dict[str, Any] = {"current_version": current}
        if current is not None:
            meta = index_store.read_meta(self.redis, current, self.prefix)
            facts |= {"model_version": meta.get("model_version"), "created_at": meta.get("created_at")}
        if served_index_version is not None and served_index_version != current:
            served_meta = index_store.read_meta(self.redis, served_index_version, self.prefix)
            facts["served_created_at"] = served_meta.get("created_at")
        elif served_index_version is not None:
            facts["served_created_at"] = facts.get("created_at")
        return facts
