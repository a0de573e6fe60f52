"""Hot swap: serve the snapshot the index source names, with its index, and keep the index current.

`SnapshotWatcher` is the one watcher path, whatever the `IndexSource`. Its lifespan task asks the
source every `interval_s` which snapshot to serve (`wanted`: the store's PROMOTED pointer for an
in-process index, the snapshot of the current Redis index for the indexer's); when that names a
version other than the one being served it loads the snapshot (checksums verified by the store) and
its index in a worker thread, so the event loop keeps answering requests, then swaps the pair in. The
pointer is the truth in both directions: a lower version is a rollback (docs/operations.md) and is
served like any other. A second task asks the source every `refresh_interval_s` to apply index
updates that need no new snapshot (Redis deltas).

A failed load (a `CorruptSnapshot`, a missing catalogue, any exception) keeps the old pair
serving, is counted and logged, and is not retried for the same pointer until `backoff_s`
has passed. A new pointer (a new version, or the same version promoted again) is tried at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from retrieval_api.state import IndexSource, ServingPair, ServingState, load_pair_from_store
from streaming.snapshots import Pointer, SnapshotStore

log = logging.getLogger("hsnn.retrieval_api")

SUCCESS, FAILURE = "success", "failure"


class SnapshotWatcher:
    """Keeps `state` on the snapshot `source` names (newer or older), as long as it loads, and its index current."""

    def __init__(
        self,
        store: SnapshotStore,
        source: IndexSource,
        state: ServingState,
        *,
        device: str = "cpu",
        interval_s: float = 2.0,
        refresh_interval_s: float = 0.25,
        backoff_s: float = 60.0,
        on_reload: Callable[[str, float], None] | None = None,
        on_adopt: Callable[[ServingPair, ServingPair | None], None] | None = None,
    ):
        """`on_reload(outcome, seconds)` is told of every load attempt ("success" or "failure"); `on_adopt(new,
        previous)` right after each swap (the freshness metrics take their adoption time there)."""
        self.store = store
        self.source = source
        self.state = state
        self.device = device
        self.interval_s = interval_s
        self.refresh_interval_s = refresh_interval_s
        self.backoff_s = backoff_s
        self.on_reload = on_reload
        self.on_adopt = on_adopt
        self._failed: tuple[Pointer, float] | None = None  # the pointer that last failed, and when
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        if any(not task.done() for task in self._tasks):
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._every(self.interval_s, self.poll_once, "poll"), name="hsnn-snapshot-watcher"),
            loop.create_task(
                self._every(self.refresh_interval_s, self.refresh_once, "index refresh"), name="hsnn-index-refresh"
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    @staticmethod
    async def _every(seconds: float, step: Callable[[], Awaitable[object]], what: str) -> None:
        while True:
            try:
                await step()
            except Exception:  # never let the watcher die (a Redis hiccup, a bug): the next round tries again
                log.exception("snapshot watcher %s failed", what)
            await asyncio.sleep(seconds)

    async def refresh_once(self) -> bool:
        """Apply the source's index updates to the served pair once; True if it changed."""
        return await asyncio.to_thread(self.source.refresh, self.state)

    def load(self, version: int) -> ServingPair:
        """Snapshot `version` from the store, paired with its index from the source (runs in a worker thread)."""
        return load_pair_from_store(self.store, version, self.source, device=self.device)

    async def poll_once(self) -> str | None:
        """Check the pointer once; returns "success" or "failure" if a load was attempted, else None."""
        try:
            pointer = await asyncio.to_thread(self.source.wanted, self.store)
        except Exception as exc:
            log.warning(
                "cannot read which snapshot to serve (%s index, store %s): %s", self.source.kind, self.store.root, exc
            )
            return None
        if pointer is None:
            return None
        current = self.state.current()
        served = current.model_version if current is not None else 0
        if pointer.version == served:
            return None
        if self._failed is not None:
            failed_pointer, failed_at = self._failed
            if failed_pointer == pointer and time.monotonic() - failed_at < self.backoff_s:
                return None
        started = time.perf_counter()
        try:
            pair = await asyncio.to_thread(self.load, pointer.version)
        except Exception as exc:
            self._failed = (pointer, time.monotonic())
            self._report(FAILURE, started)
            log.error(
                "could not load promoted snapshot %d (%s: %s); keep serving %s, retry in %.0fs or when re-promoted",
                pointer.version,
                type(exc).__name__,
                exc,
                served or "nothing",
                self.backoff_s,
            )
            return FAILURE
        self._failed = None
        previous = self.state.swap(pair)  # only this watcher changes the model; index refreshes never do
        if self.on_adopt is not None:
            try:
                self.on_adopt(pair, previous)
            except Exception:  # metrics must never undo or fail a swap
                log.exception("recording the adoption of snapshot %d failed", pair.model_version)
        self._report(SUCCESS, started)
        if served and pair.model_version < served:
            log.warning("rolled back from snapshot %d to %d (the pointer moved back)", served, pair.model_version)
        log.info("hot-swapped to snapshot %d in %.2fs", pair.model_version, time.perf_counter() - started)
        return SUCCESS

    def _report(self, outcome: str, started: float) -> None:
        if self.on_reload is not None:
            self.on_reload(outcome, time.perf_counter() - started)
