"""Dynamic micro-batching: concurrent requests share one call of a scoring function.

A generic bounded queue: it knows nothing of models or users. Requests wait in the queue (a full
queue is refused at once: `Overloaded`, HTTP 429). One worker takes the first waiting request and
everything already queued behind it (requests that arrived while the previous batch was scored). The
wait for more adapts to load: when the previous batch was a lone request (an idle service) the batch
goes at once, so a single client pays no `max_wait_ms`; after a batch of several (clients are
arriving) it waits up to `max_wait_ms` for company until it has `max_batch`. It drops the ones whose deadline
passed (`DeadlineExceeded`, 504) and calls `score` once for the rest in a worker thread, so the
event loop keeps accepting requests. `score` returns one outcome per query, a result or the
exception that concerns that query alone. If the batched call itself raises, every query is
scored again on its own, so one poisoned request fails alone (`QueryFailed`) and never takes the
rest of its micro-batch with it. What is scored, and how, is `retrieval_api.scoring`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("hsnn.retrieval_api")

Q = TypeVar("Q")
R = TypeVar("R")


class Overloaded(Exception):
    """The request queue is full."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could be scored."""


class QueryFailed(Exception):
    """Scoring this query alone raised: a bug, logged with its traceback; the other queries are unaffected."""


def _failure() -> QueryFailed:
    return QueryFailed("scoring this request failed; see the service log")


@dataclass
class _Waiting(Generic[Q]):
    """A query in the queue, with its deadline and the future its caller awaits."""

    query: Q
    deadline: float | None  # time.monotonic() after which the query is not worth scoring
    future: asyncio.Future = field(repr=False)
    enqueued_at: float = field(default_factory=time.monotonic)


class Batcher(Generic[Q, R]):
    """Queues queries and hands them to `score` in batches of at most `max_batch`."""

    def __init__(
        self,
        score: Callable[[Sequence[Q]], Sequence[R | Exception]],
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        queue_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        """`on_batch(size)` is told the size of every batch handed to `score` (the batch-size histogram)."""
        self.score = score
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Waiting[Q]] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_batch = 1  # size of the previous batch: > 1 means load, so waiting for company pays

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the worker on the running loop (also done lazily by the first `submit`)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._worker is not None and not self._worker.done():
            return
        self._loop = loop
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._worker = loop.create_task(self._run(self._queue), name="hsnn-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._worker, self._queue, self._loop = None, None, None

    async def submit(self, query: Q, deadline_ms: int | None = None) -> R:
        """Queue one query and wait for its outcome; raises Overloaded at once when the queue is full."""
        self.start()
        assert self._queue is not None
        now = time.monotonic()
        waiting = _Waiting(
            query=query,
            deadline=None if deadline_ms is None else now + deadline_ms / 1000,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=now,
        )
        try:
            self._queue.put_nowait(waiting)
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue_size} requests are already waiting; retry later") from None
        return await waiting.future

    async def _run(self, queue: asyncio.Queue[_Waiting[Q]]) -> None:
        while True:
            batch = await self._gather(queue)
            try:
                await self._score(batch)
            except Exception as exc:  # never let one bad batch stop the worker
                log.exception("batch of %d failed", len(batch))
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)

    async def _gather(self, queue: asyncio.Queue[_Waiting[Q]]) -> list[_Waiting[Q]]:
        batch = [await queue.get()]
        until = time.monotonic() + (self.max_wait if self._last_batch > 1 else 0.0)
        while len(batch) < self.max_batch:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        self._last_batch = len(batch)
        return batch

    async def _score(self, batch: list[_Waiting[Q]]) -> None:
        now = time.monotonic()
        ready = []
        for waiting in batch:
            if waiting.future.done():  # the client went away
                continue
            if waiting.deadline is not None and now > waiting.deadline:
                waited = (now - waiting.enqueued_at) * 1000
                waiting.future.set_exception(
                    DeadlineExceeded(f"deadline passed after {waited:.1f} ms in the queue, before scoring started")
                )
            else:
                ready.append(waiting)
        if not ready:
            return
        if self.on_batch is not None:
            self.on_batch(len(ready))
        outcomes = await asyncio.to_thread(self._score_isolated, [waiting.query for waiting in ready])
        for waiting, outcome in zip(ready, outcomes, strict=True):
            if waiting.future.done():
                continue
            if isinstance(outcome, Exception):
                waiting.future.set_exception(outcome)
            else:
                waiting.future.set_result(outcome)

    def _score_isolated(self, queries: list[Q]) -> list[R | Exception]:
        """Score the batch in one call; if that raises, score each query alone so only the culprit fails."""
        try:
            return list(self.score(queries))
        except Exception:
            if len(queries) == 1:
                log.exception("query failed")
                return [_failure()]
            log.warning("batch of %d failed; scoring its queries one by one", len(queries), exc_info=True)
        outcomes: list[R | Exception] = []
        for query in queries:
            try:
                outcomes.extend(self.score([query]))
            except Exception:
                log.exception("query failed on its own")
                outcomes.append(_failure())
        return outcomes
