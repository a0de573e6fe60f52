"""Progress display for long jobs (index builds, benchmarks): tqdm on stderr, silent when disabled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    yield from tqdm(items, desc=description, total=total, unit="batch", leave=False, dynamic_ncols=True)
