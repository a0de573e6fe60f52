"""Hot swap: follow the publisher's PROMOTED pointer and swap in each new model/index pair.

`SnapshotWatcher` is an asyncio task started by the app's lifespan. Every `interval_s` it
reads `store.promoted()`; when the pointer names a version other than the one being served it
loads that snapshot (checksums verified by the store) and its index in a worker thread, so
the event loop keeps answering requests, then swaps the pair in. The pointer is the truth in
both directions: a lower version is a rollback (docs/operations.md) and is served like any
other promotion.

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
from collections.abc import Callable

from retrieval_api.state import ServingPair, ServingState
from streaming.snapshots import Pointer, SnapshotStore

log = logging.getLogger("hsnn.retrieval_api")

SUCCESS, FAILURE = "success", "failure"


class SnapshotWatcher:
    """Polls `store` and keeps `state` on the promoted version (newer or older), as long as it loads."""

    def __init__(
        self,
        store: SnapshotStore,
        state: ServingState,
        load: Callable[[int], ServingPair],
        interval_s: float = 2.0,
        backoff_s: float = 60.0,
        on_reload: Callable[[str, float], None] | None = None,
        on_adopt: Callable[[ServingPair, ServingPair | None], None] | None = None,
    ):
        """`load(version)` returns the pair for a version (run in a worker thread); `on_reload(outcome, seconds)`
        is told of every attempt ("success" or "failure"); `on_adopt(new, previous)` right after each swap
        (the freshness metrics take their adoption time there)."""
        self.store = store
        self.state = state
        self.load = load
        self.interval_s = interval_s
        self.backoff_s = backoff_s
        self.on_reload = on_reload
        self.on_adopt = on_adopt
        self._failed: tuple[Pointer, float] | None = None  # the pointer that last failed, and when
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hsnn-snapshot-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("snapshot watcher poll failed")
            await asyncio.sleep(self.interval_s)

    async def poll_once(self) -> str | None:
        """Check the pointer once; returns "success" or "failure" if a load was attempted, else None."""
        try:
            pointer = await asyncio.to_thread(self.store.promoted)
        except Exception as exc:
            log.warning("cannot read the PROMOTED pointer under %s: %s", self.store.root, exc)
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
