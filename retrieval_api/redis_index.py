"""Serve the indexer's index from Redis: its pointer names the (model, index) pair, its delta the item churn.

The indexer writes index version v for snapshot m and flips `index:current` to v. This follower
reports "serve snapshot m with index v" to the `SnapshotWatcher` (it quacks like the store's
pointer), loads m from the snapshot store (sha256-verified) and v from Redis, and between
versions polls v's delta list so created ads become retrievable and expired ones disappear
within one poll. A rebuild for the same snapshot (a new v, same m) is picked up by `refresh`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from hsnn.model import HSNN
from retrieval_api.state import ServingPair, ServingState
from streaming import index_store
from streaming.snapshots import Pointer, SnapshotStore

log = logging.getLogger("hsnn.retrieval_api")


class IndexNotReady(RuntimeError):
    """Redis has no index built from the snapshot the watcher asked for (yet)."""


class RedisIndexFollower:
    def __init__(self, redis, store: SnapshotStore, prefix: str = index_store.DEFAULT_PREFIX, device: str = "cpu"):
        self.redis, self.store, self.prefix, self.device = redis, store, prefix, device
        self.root = f"redis index {prefix}"  # for the watcher's log lines
        self._lock = threading.Lock()
        self._view: index_store.IndexView | None = None  # the view behind the served pair

    def promoted(self) -> Pointer | None:
        """The snapshot the current Redis index was built from (what the watcher should serve)."""
        version = index_store.current_version(self.redis, self.prefix)
        if version is None:
            return None
        meta = index_store.read_meta(self.redis, version, self.prefix)
        return Pointer(version=int(meta["model_version"]), promoted_at=float(version))

    def load(self, model_version: int) -> ServingPair:
        """Load snapshot `model_version` and the current Redis index, which must have been built from it."""
        model, manifest = self.store.load(model_version, device=self.device)
        if not isinstance(model, HSNN):
            raise TypeError(f"snapshot {model_version} holds a {type(model).__name__}, the API serves HSNN models")
        view = index_store.load_index(self.redis, model, prefix=self.prefix)
        if int(view.meta["model_version"]) != model_version:
            raise IndexNotReady(f"Redis index {view.version} was built from snapshot {view.meta['model_version']}")
        with self._lock:
            self._view = view
        return ServingPair(
            model=model,
            index=view.index,
            model_version=model_version,
            index_version=view.version,
            snapshot_created_at=manifest.created_at,
            event_time_watermark=manifest.event_time_watermark,
        )

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
