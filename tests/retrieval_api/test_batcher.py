"""The batcher's adaptive wait: a lone request is not held for max_wait_ms; under load requests share batches."""

from __future__ import annotations

import asyncio
import time

from retrieval_api.batcher import Batcher


def test_a_lone_request_on_an_idle_service_does_not_wait_for_company():
    batcher = Batcher(lambda queries: [q * 2 for q in queries], max_batch=32, max_wait_ms=2000)

    async def scenario() -> tuple[int, float]:
        started = time.monotonic()
        answer = await batcher.submit(21)
        elapsed = time.monotonic() - started
        await batcher.stop()
        return answer, elapsed

    answer, elapsed = asyncio.run(scenario())
    assert answer == 42 and elapsed < 1.0  # a fixed wait would have held it 2 s


def test_requests_arriving_while_a_batch_runs_are_gathered_and_match_one_by_one():
    sizes: list[int] = []

    def score(queries):
        time.sleep(0.05)  # a batch in flight: the next requests queue up meanwhile
        return [q * q for q in queries]

    batcher = Batcher(score, max_batch=8, max_wait_ms=20, on_batch=sizes.append)

    async def scenario() -> list[int]:
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)  # the lone first request is being scored
        rest = [asyncio.create_task(batcher.submit(q)) for q in range(2, 17)]
        answers = await asyncio.gather(first, *rest)
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [q * q for q in range(1, 17)]
    assert sizes[0] == 1 and sizes[1] == 8 and len(sizes) <= 4, sizes
