"""Helpers shared by the data-set loaders: where the data lives, id buckets, history gathering, scaling."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from hsnn.features import hash_ids
from hsnn.monn import HashedEmbeddingBags

DATASETS_ENV = "HSNN_DATASETS_DIR"


def datasets_dir() -> Path:
    """The shared, read-only data sets: $HSNN_DATASETS_DIR, else `<repo>/../shared/datasets`."""
    override = os.environ.get(DATASETS_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


def _salt(name: str) -> int:
    # Read the salt from the core's own embedding module so this never drifts from the model.
    return HashedEmbeddingBags({name: 2}, 1).salts[name]


def bucket_count(vocab_size: int, names: Iterable[str], factor: int = 4) -> int:
    """Embedding rows for a feature whose ids are 1..vocab_size.

    The model hashes every id (`hash_ids`), so even a 3-valued feature can collide with itself in
    a small table and lose information. For small vocabularies (<= 128 values) we search for the
    smallest table that keeps every id apart under the salt of every name the feature is embedded
    under (an item attribute is also embedded as `history_<name>`). Larger vocabularies get the
    next power of two >= factor * (vocab_size + 1): some collisions, bounded memory.
    """
    names = list(names)
    if vocab_size <= 128:
        ids = torch.arange(1, vocab_size + 1)
        salts = [_salt(name) for name in names]
        for buckets in range(max(2 * (vocab_size + 1), 8), 64 * (vocab_size + 1) + 64):
            if all(len(torch.unique(hash_ids(ids, buckets, salt))) == vocab_size for salt in salts):
                return buckets
    return 1 << math.ceil(math.log2(factor * (vocab_size + 1)))


def last_items(
    indptr: np.ndarray, values: np.ndarray, owners: np.ndarray, length: int, drop: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `length` newest entries of each owner's CSR slice, optionally leaving one position out.

    `values[indptr[o]:indptr[o + 1]]` is owner o's list, oldest first. `drop[r]` (optional) is a
    position inside row r's slice to leave out (the training target). Returns (positions, valid):
    `positions` (R, length) index into `values`, left-aligned, oldest first; `valid` marks real
    entries. Vectorised: one (R, length + 1) window per row, no Python loop over rows.
    """
    start, end = indptr[owners], indptr[owners + 1]
    size = end - start
    width = length + 1 if drop is not None else length
    take = np.minimum(size, width)
    cols = np.arange(width)
    pos = (end - take)[:, None] + cols[None, :]
    keep = cols[None, :] < take[:, None]
    if drop is not None:
        target = start + drop
        hit = keep & (pos == target[:, None])
        # Target outside the window: drop the oldest of a full window instead, so every row keeps
        # min(size - 1, length) entries whether or not its target was among the newest.
        missed = ~hit.any(axis=1) & (take == width)
        hit[missed, 0] = True
        keep &= ~hit
    order = np.argsort(~keep, axis=1, kind="stable")[:, :length]
    pos = np.take_along_axis(pos, order, axis=1)
    valid = np.take_along_axis(keep, order, axis=1)
    return np.where(valid, pos, 0), valid


class Vocabulary:
    """Categorical strings -> ids 1..V (sorted order, so reproducible); "" (missing) -> 0."""

    def __init__(self, values: Iterable[str]):
        self.values = sorted({v for v in values if v != ""})
        self.index = {v: i + 1 for i, v in enumerate(self.values)}

    def __len__(self) -> int:
        return len(self.values)

    def encode(self, values: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.index.get(v, 0) for v in values), dtype=np.int64, count=len(values))


def normalize_category(value: str) -> str:
    """'1.0' and '1' are the same category (pandas wrote some integer columns as floats)."""
    value = value.strip()
    if value.endswith(".0") and value[:-2].lstrip("-").isdigit():
        return value[:-2]
    return value


def parse_floats(values: Sequence[str]) -> np.ndarray:
    """Strings -> float64, with NaN for empty or unparsable cells."""
    try:
        return np.array(values, dtype=np.float64)  # fast path: a clean column
    except ValueError:
        pass
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            out[i] = float(v) if v.strip() else math.nan
        except ValueError:
            out[i] = math.nan
    return out


def standardize(column: np.ndarray, log: bool = False) -> np.ndarray:
    """Zero-mean unit-variance over the present values; missing (NaN) becomes 0, the mean."""
    x = np.log1p(np.clip(column, 0, None)) if log else column.astype(np.float64)
    present = ~np.isnan(x)
    if not present.any():
        return np.zeros_like(x, dtype=np.float32)
    mean, std = x[present].mean(), x[present].std()
    z = (x - mean) / (std if std > 0 else 1.0)
    return np.where(present, z, 0.0).astype(np.float32)


def as_index_array(rows: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(rows, Tensor):
        return rows.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(rows, dtype=np.int64)


_Batch = TypeVar("_Batch")


def row_batches(
    num_rows: int,
    make: Callable[[np.ndarray], _Batch],
    batch_size: int,
    rows: np.ndarray | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[_Batch]:
    """`make(rows)` over consecutive chunks of `rows` (default: all `num_rows`), in order unless `shuffle`."""
    rows = np.arange(num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    if shuffle:
        rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    for start in range(0, len(rows), batch_size):
        yield make(rows[start : start + batch_size])
