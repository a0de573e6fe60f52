"""Dynamic micro-batching: concurrent requests share one pass of the layer-wise search.

Requests wait in a bounded queue (a full queue is refused at once: `Overloaded`, HTTP 429).
One worker takes the first waiting request, then gathers more until it has `max_batch` or
`max_wait_ms` have passed, reads the serving pair once for the whole batch, and runs
`hsnn.serving.retrieve` for all of them in a worker thread so the event loop keeps
accepting requests. Each request's future gets its own result, or the error that concerns it:
if the batched pass fails, every query is scored again on its own, so one poisoned request
fails alone and never takes the rest of its micro-batch with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hsnn.serving import Retrieved, retrieve
from retrieval_api.schemas import schema_errors
from retrieval_api.state import ServingPair, ServingState
from streaming.events import MAX_FEATURE_MAGNITUDE, UserFeatures, users_to_batch

log = logging.getLogger("hsnn.retrieval_api")


class Overloaded(Exception):
    """The request queue is full."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could be scored."""


class NotReady(Exception):
    """No model/index pair is loaded yet."""


class InvalidRequest(Exception):
    """The request does not fit the served model; `errors` are FastAPI-style validation errors."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


class ConfigurationError(Exception):
    """The service settings do not fit the served model (e.g. one beam width per level)."""


class QueryFailed(Exception):
    """Scoring this query alone raised: a bug, logged with its traceback; the other queries are unaffected."""


def _failure() -> QueryFailed:
    return QueryFailed("scoring this request failed; see the service log")


@dataclass
class Query:
    user: UserFeatures
    k: int
    exclude: list[int]
    deadline: float | None  # time.monotonic() after which the query is not worth scoring
    future: asyncio.Future = field(repr=False)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Answer:
    """One query's result and the pair that produced it."""

    result: Retrieved
    pair: ServingPair


class Batcher:
    """Queues queries and scores them in batches against the pair current when the batch starts."""

    def __init__(
        self,
        state: ServingState,
        beams: Sequence[int],
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        queue_size: int = 256,
        max_history: int = 512,
        on_batch: Callable[[int], None] | None = None,
        max_dense_magnitude: float = MAX_FEATURE_MAGNITUDE,
    ):
        self.state = state
        self.beams = list(beams)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.max_history = max_history
        self.max_dense_magnitude = max_dense_magnitude
        self.on_batch = on_batch
        self._queue: asyncio.Queue[Query] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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

    async def submit(
        self, user: UserFeatures, k: int, exclude: Sequence[int] = (), deadline_ms: int | None = None
    ) -> Answer:
        """Queue one query and wait for its answer; raises Overloaded at once when the queue is full."""
        self.start()
        assert self._queue is not None
        now = time.monotonic()
        query = Query(
            user=user,
            k=k,
            exclude=list(exclude),
            deadline=None if deadline_ms is None else now + deadline_ms / 1000,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=now,
        )
        try:
            self._queue.put_nowait(query)
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue_size} requests are already waiting; retry later") from None
        return await query.future

    async def _run(self, queue: asyncio.Queue[Query]) -> None:
        while True:
            batch = await self._gather(queue)
            try:
                await self._score(batch)
            except Exception as exc:  # never let one bad batch stop the worker
                log.exception("batch of %d failed", len(batch))
                for query in batch:
                    if not query.future.done():
                        query.future.set_exception(exc)

    async def _gather(self, queue: asyncio.Queue[Query]) -> list[Query]:
        batch = [await queue.get()]
        until = time.monotonic() + self.max_wait
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
        return batch

    async def _score(self, batch: list[Query]) -> None:
        pair = self.state.current()  # once per batch: every query in it sees the same model and index
        now = time.monotonic()
        ready = []
        for query in batch:
            if query.future.done():  # the client went away
                continue
            if pair is None:
                query.future.set_exception(NotReady("no model/index pair is loaded yet"))
            elif query.deadline is not None and now > query.deadline:
                waited = (now - query.enqueued_at) * 1000
                query.future.set_exception(
                    DeadlineExceeded(f"deadline passed after {waited:.1f} ms in the queue, before scoring started")
                )
            elif errors := schema_errors(pair.schema, query.user, self.max_history, self.max_dense_magnitude):
                query.future.set_exception(InvalidRequest(errors))  # the model was swapped for another schema
            else:
                ready.append(query)
        if not ready or pair is None:
            return
        if len(self.beams) != pair.model.num_levels:
            exc = ConfigurationError(
                f"beams {self.beams} give {len(self.beams)} widths; the served model has {pair.model.num_levels} levels"
            )
            for query in ready:
                query.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(ready))
        outcomes = await asyncio.to_thread(self._retrieve_isolated, pair, ready)
        for query, outcome in zip(ready, outcomes, strict=True):
            if query.future.done():
                continue
            if isinstance(outcome, Exception):
                query.future.set_exception(outcome)
            else:
                query.future.set_result(Answer(result=outcome, pair=pair))

    def _retrieve_isolated(self, pair: ServingPair, queries: list[Query]) -> list[Retrieved | Exception]:
        """Score the batch in one pass; if that fails, score each query alone so only the culprit fails."""
        try:
            return list(self._retrieve(pair, queries))
        except Exception:
            if len(queries) == 1:
                log.exception("query failed")
                return [_failure()]
            log.warning("batch of %d failed; scoring its queries one by one", len(queries), exc_info=True)
        outcomes: list[Retrieved | Exception] = []
        for query in queries:
            try:
                outcomes.extend(self._retrieve(pair, [query]))
            except Exception:
                log.exception("query failed on its own")
                outcomes.append(_failure())
        return outcomes

    def _retrieve(self, pair: ServingPair, queries: list[Query]) -> list[Retrieved]:
        users = users_to_batch([query.user for query in queries], pair.schema)
        exclude = [torch.tensor(query.exclude, dtype=torch.long) if query.exclude else None for query in queries]
        k = max(query.k for query in queries)
        results = retrieve(pair.model, pair.index, users, k=k, beams=self.beams, exclude=exclude)
        return [
            Retrieved(
                item_ids=result.item_ids[: query.k],
                scores=result.scores[: query.k],
                rows=result.rows[: query.k],
                cost=result.cost,
            )
            for query, result in zip(queries, results, strict=True)
        ]
