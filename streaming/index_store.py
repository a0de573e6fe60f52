"""The versioned index in Redis: what the indexer writes and the retrieval API reads.

A version's meta and blobs never change once written (meta is written last, so a version with meta
is complete); only its delta grows. This module writes, reads, points at, rolls back and collects
versions, and reads their deltas. The key layout and blob encoding are `streaming.index_layout`; the
live catalogue and the item events that feed the deltas are `streaming.item_catalog`. Both are
re-exported here, so `from streaming import index_store` reaches the whole store.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsnn.features import ItemBatch
from hsnn.index import HierarchicalIndex, IndexLevel
from hsnn.model import HSNN
from streaming.index_layout import DEFAULT_CHUNK_BYTES, DEFAULT_PREFIX, IndexKeys, decode_blob, encode_blob
from streaming.item_catalog import (
    APPLIED,
    CHANGES_MAXLEN,
    RETRY,
    SUPERSEDED,
    CatalogEntry,
    ItemEncoder,
    apply_item_event,
    apply_item_events,
    catalog_entry,
    catalog_to_batch,
    catch_up,
    changes_position,
    fits_schema,
    read_catalog,
)

__all__ = [
    "APPLIED",
    "CHANGES_MAXLEN",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_PREFIX",
    "RETRY",
    "SUPERSEDED",
    "CatalogEntry",
    "IndexKeys",
    "IndexNotFound",
    "IndexView",
    "ItemEncoder",
    "allocate_version",
    "apply_delta",
    "apply_item_event",
    "apply_item_events",
    "catalog_entry",
    "catalog_to_batch",
    "catch_up",
    "changes_position",
    "current_version",
    "decode_blob",
    "delete_version",
    "delta_length",
    "encode_blob",
    "fits_schema",
    "flip_pointer",
    "gc",
    "load_index",
    "previous_version",
    "read_catalog",
    "read_delta",
    "read_index",
    "read_meta",
    "refresh",
    "rollback",
    "write_index",
]

META_FORMAT = 1
_LEVEL_FIELDS = ("keys", "embedding", "projected", "representative", "child_offsets", "sizes")


class IndexNotFound(LookupError):
    """No complete index version under this number (never written, unfinished, or garbage-collected)."""


def _index_tensors(index: HierarchicalIndex) -> dict[str, Tensor]:
    tensors = {
        "item_ids": index.item_ids,
        "item_embeddings": index.item_embeddings.float(),
        "paths": index.paths,
        "item_nodes": index.item_nodes,
        "leaf_items": index.leaf_items,
        "live": index.live,
        "items.dense": index.items.dense.float(),
    }
    tensors |= {f"items.sparse.{name}": values for name, values in index.items.sparse.items()}
    for level_idx, level in enumerate(index.levels):
        tensors |= {f"level{level_idx}.{name}": getattr(level, name) for name in _LEVEL_FIELDS}
    return tensors


# --------------------------------------------------------------------------------------------
# Versions: write, read, pointer, rollback, GC
# --------------------------------------------------------------------------------------------


def allocate_version(redis, prefix: str = DEFAULT_PREFIX) -> int:
    """A fresh index version, above every version handed out before and above the current one."""
    keys = IndexKeys(prefix)
    version = int(redis.incr(keys.next_version))
    current = current_version(redis, prefix) or 0
    if version <= current:  # the counter was lost (e.g. restored from an old dump): jump past current
        redis.set(keys.next_version, current + 1)
        version = current + 1
    return version


def write_index(
    redis,
    index: HierarchicalIndex,
    version: int,
    model_version: int,
    *,
    prefix: str = DEFAULT_PREFIX,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `index` as `version` (blobs first, meta last) and return the meta. Does not move the pointer."""
    keys = IndexKeys(prefix)
    if redis.exists(keys.meta(version)):
        raise ValueError(f"index version {version} already exists; versions are immutable")
    redis.sadd(keys.versions, version)  # first, so GC finds a write that dies half-way
    blobs: dict[str, dict[str, Any]] = {}
    pipe = redis.pipeline(transaction=False)
    pending = 0
    for name, tensor in _index_tensors(index).items():
        spec, chunks = encode_blob(tensor, chunk_bytes)
        blobs[name] = spec
        for i, chunk in enumerate(chunks):
            pipe.set(keys.blob(version, name, i), chunk)
            pending += len(chunk)
            if pending >= 4 * chunk_bytes:
                pipe.execute()
                pending = 0
    pipe.execute()
    meta = {
        "format": META_FORMAT,
        "version": version,
        "model_version": model_version,
        "created_at": time.time(),
        "codebook_sizes": list(index.codebook_sizes),
        "num_levels": len(index.levels),
        "num_items": index.num_items,
        "num_live": int(index.live.sum()),
        "nodes_per_level": [len(level.keys) for level in index.levels],
        "item_sparse": list(index.items.sparse),
        "embedding_shape": list(index.item_embeddings.shape[1:]),
        "blobs": blobs,
    }
    meta |= extra_meta or {}
    redis.set(keys.meta(version), json.dumps(meta))
    return meta


def read_meta(redis, version: int, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    raw = redis.get(IndexKeys(prefix).meta(version))
    if raw is None:
        raise IndexNotFound(f"index version {version} does not exist (or is incomplete)")
    return json.loads(raw)


def read_index(redis, version: int, prefix: str = DEFAULT_PREFIX) -> HierarchicalIndex:
    """The index exactly as written under `version` (deltas not applied: see `load_index`)."""
    keys = IndexKeys(prefix)
    meta = read_meta(redis, version, prefix)
    names = list(meta["blobs"])
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.mget([keys.blob(version, name, i) for i in range(meta["blobs"][name]["chunks"])])
    tensors = {
        name: decode_blob(meta["blobs"][name], chunks) for name, chunks in zip(names, pipe.execute(), strict=True)
    }
    levels = [
        IndexLevel(**{field: tensors[f"level{lvl}.{field}"] for field in _LEVEL_FIELDS})
        for lvl in range(meta["num_levels"])
    ]
    items = ItemBatch(
        dense=tensors["items.dense"], sparse={name: tensors[f"items.sparse.{name}"] for name in meta["item_sparse"]}
    )
    return HierarchicalIndex(
        item_ids=tensors["item_ids"],
        items=items,
        item_embeddings=tensors["item_embeddings"],
        paths=tensors["paths"],
        item_nodes=tensors["item_nodes"],
        levels=levels,
        leaf_items=tensors["leaf_items"],
        live=tensors["live"],
        codebook_sizes=list(meta["codebook_sizes"]),
    )


def _int_or_none(raw: bytes | str | None) -> int | None:
    return None if raw is None else int(raw)


def current_version(redis, prefix: str = DEFAULT_PREFIX) -> int | None:
    return _int_or_none(redis.get(IndexKeys(prefix).current))


def previous_version(redis, prefix: str = DEFAULT_PREFIX) -> int | None:
    return _int_or_none(redis.get(IndexKeys(prefix).previous))


# KEYS: current, previous, meta of the new version, flips channel; ARGV: expected ("" = none), new
_FLIP = """
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if cur then redis.call('SET', KEYS[2], cur) end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[2])
return 1
"""

# KEYS: current, previous, flips channel; ARGV: meta key prefix, meta key suffix
_ROLLBACK = """
local cur = redis.call('GET', KEYS[1])
local prev = redis.call('GET', KEYS[2])
if not cur or not prev then return false end
if redis.call('EXISTS', ARGV[1] .. prev .. ARGV[2]) == 0 then return false end
redis.call('SET', KEYS[1], prev)
redis.call('SET', KEYS[2], cur)
redis.call('PUBLISH', KEYS[3], prev)
return prev
"""


def flip_pointer(redis, expected: int | None, new: int, prefix: str = DEFAULT_PREFIX) -> bool:
    """Point readers at `new` only if the pointer still holds `expected` (None = no index yet).

    The old value becomes `index:previous`. Refuses (ValueError) a `new` version without meta.
    """
    keys = IndexKeys(prefix)
    result = redis.eval(
        _FLIP,
        4,
        keys.current,
        keys.previous,
        keys.meta(new),
        keys.flips,
        "" if expected is None else str(expected),
        new,
    )
    if result == -1:
        raise ValueError(f"index version {new} is not completely written; refusing to point readers at it")
    return result == 1


def rollback(redis, prefix: str = DEFAULT_PREFIX) -> int | None:
    """Swap current and previous (if previous still exists); returns the version now current, or None."""
    keys = IndexKeys(prefix)
    result = redis.eval(_ROLLBACK, 3, keys.current, keys.previous, keys.flips, f"{prefix}idx:", ":meta")
    return _int_or_none(result)


def delete_version(redis, version: int, prefix: str = DEFAULT_PREFIX) -> int:
    """Remove every key of one version (meta first, so readers stop seeing it); returns keys removed."""
    keys = IndexKeys(prefix)
    removed = int(redis.unlink(keys.meta(version)))
    doomed = list(redis.scan_iter(match=keys.version_pattern(version), count=1000))
    for start in range(0, len(doomed), 1000):
        removed += int(redis.unlink(*doomed[start : start + 1000]))
    redis.srem(keys.versions, version)
    return removed


def gc(redis, keep: int = 2, prefix: str = DEFAULT_PREFIX) -> list[int]:
    """Delete old versions: keeps current, previous, the newest `keep` complete versions up to current,
    and anything above current (a rebuild that has not flipped yet). Returns the versions deleted."""
    keys = IndexKeys(prefix)
    current, previous = current_version(redis, prefix), previous_version(redis, prefix)
    if current is None:
        return []
    versions = sorted(int(v) for v in redis.smembers(keys.versions))
    complete = [v for v in versions if v <= current and redis.exists(keys.meta(v))]
    kept = {current, previous, *complete[-keep:]} if keep > 0 else {current, previous}
    doomed = [v for v in versions if v < current and v not in kept]
    for version in doomed:
        delete_version(redis, version, prefix)
    return doomed


# --------------------------------------------------------------------------------------------
# Reading deltas
# --------------------------------------------------------------------------------------------


def delta_length(redis, version: int, prefix: str = DEFAULT_PREFIX) -> int:
    """The version's delta sequence number: how many changes it has had (O(1) to poll)."""
    return int(redis.llen(IndexKeys(prefix).delta(version)))


def read_delta(redis, version: int, since: int = 0, prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Delta entries since..end (entry i has sequence number i + 1)."""
    return [json.loads(raw) for raw in redis.lrange(IndexKeys(prefix).delta(version), since, -1)]


def apply_delta(index: HierarchicalIndex, model: HSNN, entries: Iterable[dict[str, Any]]) -> HierarchicalIndex:
    """A new in-memory index with delta entries applied in order (`index` is not modified).

    Per ad the last entry wins; an upsert replaces the ad's row (expire + append under its hard path),
    an expire marks it expired.
    """
    last: dict[int, dict[str, Any]] = {}
    for entry in entries:
        last.pop(entry["ad_id"], None)
        last[entry["ad_id"]] = entry
    if not last:
        return index
    expired = torch.tensor([a for a, e in last.items() if e["op"] == "expire"], dtype=torch.long)
    result = dataclasses.replace(index, live=index.live & ~torch.isin(index.item_ids, expired))
    upserts = [e for e in last.values() if e["op"] == "upsert"]
    if not upserts:
        return result
    shape = index.item_embeddings.shape[1:]
    embeddings = torch.stack(
        [
            torch.from_numpy(np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4").copy()).reshape(shape)
            for e in upserts
        ]
    )
    items = ItemBatch(
        dense=torch.tensor([e["dense"] for e in upserts], dtype=torch.float32).reshape(len(upserts), -1),
        sparse={
            name: torch.tensor([e["sparse"][name] for e in upserts], dtype=torch.long) for name in index.items.sparse
        },
    )
    return result.with_items(
        model,
        torch.tensor([e["ad_id"] for e in upserts], dtype=torch.long),
        items,
        item_embeddings=embeddings,
        paths=torch.tensor([e["path"] for e in upserts], dtype=torch.long),
    )


@dataclass(frozen=True)
class IndexView:
    """An index version with its delta applied up to `delta_seq`."""

    version: int
    meta: dict[str, Any]
    index: HierarchicalIndex
    delta_seq: int


def load_index(redis, model: HSNN, version: int | None = None, prefix: str = DEFAULT_PREFIX) -> IndexView:
    """Read pointer -> version -> meta -> blobs -> delta; raises IndexNotFound when there is nothing to read."""
    if version is None:
        version = current_version(redis, prefix)
        if version is None:
            raise IndexNotFound("no current index version")
    meta = read_meta(redis, version, prefix)
    index = read_index(redis, version, prefix)
    entries = read_delta(redis, version, 0, prefix)
    return IndexView(version, meta, apply_delta(index, model, entries), len(entries))


def refresh(redis, view: IndexView, model: HSNN, prefix: str = DEFAULT_PREFIX) -> IndexView:
    """`view` with the delta entries added since it was read (one LLEN when there are none)."""
    if delta_length(redis, view.version, prefix) == view.delta_seq:
        return view
    entries = read_delta(redis, view.version, view.delta_seq, prefix)
    return dataclasses.replace(
        view, index=apply_delta(view.index, model, entries), delta_seq=view.delta_seq + len(entries)
    )
