"""The versioned index in Redis: what the indexer writes and the retrieval API reads.

Layout (every key under a configurable prefix, "hsnn:" by default; docs/index_store.md has the details):

    index:current              version readers serve (an integer), moved only by a compare-and-set script
    index:previous             the version `current` replaced, kept for rollback
    index:next_version         counter handing out index versions
    index:versions             set of every version written and not yet garbage-collected
    index:flips                pub/sub channel: the new version after every flip or rollback
    idx:{v}:meta               JSON: model version, created_at, codebook sizes, counts, blob specs
    idx:{v}:blob:{name}:{i}    chunk i of a tensor's raw little-endian bytes (numpy tobytes; never pickle)
    idx:{v}:delta              list of JSON changes since the version was built; its length is the delta sequence
    catalog                    hash ad id -> "{sequence} {event_time} {json}": the live catalogue
    catalog:changes            stream of ad ids whose catalogue entry changed (capped), for rebuild catch-up

A version's meta and blobs never change once written (meta is written last, so a version with meta
is complete); only its delta grows. Item events go through one Lua script that checks the ad's stored
(sequence, event_time) with `streaming.events.supersedes` semantics and writes catalogue and delta at once.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch
from hsnn.index import HierarchicalIndex, IndexLevel, encode_catalog
from hsnn.model import HSNN
from streaming.contracts import ItemEvent
from streaming.tensors import stack_items
from streaming.validation import item_problems

DEFAULT_PREFIX = "hsnn:"
DEFAULT_CHUNK_BYTES = 8 << 20
META_FORMAT = 1
CHANGES_MAXLEN = 1_000_000

_DTYPES: dict[torch.dtype, str] = {torch.int64: "<i8", torch.float32: "<f4", torch.bool: "|b1"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}
_LEVEL_FIELDS = ("keys", "embedding", "projected", "representative", "child_offsets", "sizes")


class IndexNotFound(LookupError):
    """No complete index version under this number (never written, unfinished, or garbage-collected)."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexKeys:
    """Every Redis key of the layout under one prefix (docs/index_store.md)."""

    prefix: str = DEFAULT_PREFIX

    current = property(lambda self: f"{self.prefix}index:current")  # the served index version
    previous = property(lambda self: f"{self.prefix}index:previous")  # the one before it (rollback)
    next_version = property(lambda self: f"{self.prefix}index:next_version")  # INCR counter
    versions = property(lambda self: f"{self.prefix}index:versions")  # every version written, not yet GC-ed
    flips = property(lambda self: f"{self.prefix}index:flips")  # pub/sub: the version after a flip or rollback
    catalog = property(lambda self: f"{self.prefix}catalog")  # ad id -> newest item event
    changes = property(lambda self: f"{self.prefix}catalog:changes")  # stream of changed ad ids

    def meta(self, version: int) -> str:
        return f"{self.prefix}idx:{version}:meta"

    def blob(self, version: int, name: str, chunk: int) -> str:
        return f"{self.prefix}idx:{version}:blob:{name}:{chunk}"

    def delta(self, version: int) -> str:
        return f"{self.prefix}idx:{version}:delta"

    def version_pattern(self, version: int) -> str:
        return f"{self.prefix}idx:{version}:*"


# --------------------------------------------------------------------------------------------
# Blobs: tensors as raw bytes, dtype and shape in the meta
# --------------------------------------------------------------------------------------------


def encode_blob(tensor: Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[dict[str, Any], list[bytes]]:
    """A tensor as (spec, chunks): spec = {dtype, shape, nbytes, chunks}; chunks of at most `chunk_bytes`."""
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"cannot store a {tensor.dtype} tensor (allowed: {sorted(str(d) for d in _DTYPES)})")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    dtype = _DTYPES[tensor.dtype]
    data = tensor.detach().cpu().contiguous().numpy().astype(dtype, copy=False).tobytes()
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    return {"dtype": dtype, "shape": list(tensor.shape), "nbytes": len(data), "chunks": len(chunks)}, chunks


def decode_blob(spec: dict[str, Any], chunks: Sequence[bytes | None]) -> Tensor:
    """Inverse of `encode_blob`; raises ValueError on a missing chunk or a size that does not match."""
    if spec["dtype"] not in _TORCH_DTYPES:
        raise ValueError(f"unknown blob dtype {spec['dtype']!r}")
    if len(chunks) != spec["chunks"] or any(c is None for c in chunks):
        raise ValueError(f"blob has {spec['chunks']} chunks, {sum(c is not None for c in chunks)} found")
    data = b"".join(chunks)  # type: ignore[arg-type]
    if len(data) != spec["nbytes"]:
        raise ValueError(f"blob holds {len(data)} bytes, the meta says {spec['nbytes']}")
    array = np.frombuffer(data, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
    return torch.from_numpy(array.copy())


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
# Catalogue and item events
# --------------------------------------------------------------------------------------------

# KEYS: catalog, current pointer, delta of the expected version, changes stream
# ARGV: ad id, sequence, event_time, record json, expected version ("" = no index), delta entry, changes maxlen
# Returns -1 when the pointer no longer holds the expected version (re-encode with the new model and retry),
# 0 when the stored version is as new or newer (replay / late event: nothing written), else >= 1.
_APPLY = """
local cur = redis.call('GET', KEYS[2]) or ''
if cur ~= ARGV[5] then return -1 end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local oseq, otime = string.match(old, '^(%d+) (%S+) ')
  local seq = ARGV[2]
  local newer
  if #seq ~= #oseq then newer = #seq > #oseq
  elseif seq ~= oseq then newer = seq > oseq
  else newer = tonumber(ARGV[3]) > tonumber(otime) end
  if not newer then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'ad', ARGV[1])
if ARGV[5] == '' then return 1 end
return redis.call('RPUSH', KEYS[3], ARGV[6])
"""

# KEYS: catalog, delta; ARGV: ad id, catalogue value read before, delta entry
_PUSH_IF_UNCHANGED = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
return redis.call('RPUSH', KEYS[2], ARGV[3])
"""

APPLIED, SUPERSEDED, RETRY = "applied", "superseded", "retry"


@dataclass(frozen=True)
class CatalogEntry:
    ad_id: int
    sequence: int
    event_time: float
    live: bool
    features: dict[str, Any] | None  # ItemFeatures as JSON ({"dense": [...], "sparse": {...}}); None once expired

    def value(self) -> str:
        record = {"state": "live" if self.live else "expired", "features": self.features}
        return f"{self.sequence} {self.event_time!r} {json.dumps(record, separators=(',', ':'))}"

    @staticmethod
    def parse(ad_id: int | bytes | str, value: bytes | str) -> CatalogEntry:
        text = value.decode() if isinstance(value, bytes) else value
        sequence, event_time, record = text.split(" ", 2)
        data = json.loads(record)
        return CatalogEntry(int(ad_id), int(sequence), float(event_time), data["state"] == "live", data["features"])

    @staticmethod
    def from_event(event: ItemEvent) -> CatalogEntry:
        features = None if event.features is None else event.features.model_dump(mode="json")
        return CatalogEntry(event.ad_id, event.sequence, event.event_time, event.op != "expire", features)


@dataclass
class ItemEncoder:
    """The model of one index version: turns live ads into delta entries (item tower + hard path)."""

    model: HSNN
    index_version: int
    batch_size: int = 8192

    @property
    def schema(self) -> FeatureSchema:
        return self.model.config.features

    def encode(self, entries: Sequence[CatalogEntry]) -> list[dict[str, Any]]:
        if not entries:
            return []
        items = catalog_to_batch(entries, self.schema)
        embeddings = encode_catalog(self.model, items, self.batch_size)
        paths = self.model.index.assign(self.model.index_vectors(embeddings, items))
        out = []
        for row, entry in enumerate(entries):
            out.append(
                {
                    "op": "upsert",
                    "ad_id": entry.ad_id,
                    "sequence": entry.sequence,
                    "event_time": entry.event_time,
                    "dense": items.dense[row].tolist(),
                    "sparse": {name: int(values[row]) for name, values in items.sparse.items()},
                    "embedding": base64.b64encode(embeddings[row].float().numpy().astype("<f4").tobytes()).decode(),
                    "path": paths[row].tolist(),
                }
            )
        return out


def _expire_entry(entry: CatalogEntry) -> dict[str, Any]:
    return {"op": "expire", "ad_id": entry.ad_id, "sequence": entry.sequence, "event_time": entry.event_time}


def catalog_to_batch(entries: Sequence[CatalogEntry], schema: FeatureSchema) -> ItemBatch:
    """Live catalogue entries that fit `schema` (`fits_schema`) as an ItemBatch, built like the events' batches."""
    features = [e.features or {} for e in entries]
    return stack_items(
        [e.ad_id for e in entries], [f["dense"] for f in features], [f["sparse"] for f in features], schema
    )


def fits_schema(entry: CatalogEntry, schema: FeatureSchema) -> bool:
    """A live entry whose stored features pass the one validator (`streaming.validation.item_problems`)."""
    if entry.features is None:
        return False
    features = entry.features
    return not item_problems(entry.ad_id, features.get("dense", ()), features.get("sparse", {}), schema)


def apply_item_events(
    redis, events: Sequence[ItemEvent], encoder: ItemEncoder | None, prefix: str = DEFAULT_PREFIX
) -> list[str]:
    """Apply item events in order, each atomically: catalogue + the current version's delta.

    For each event: "applied", "superseded" (replay or late event: nothing changed) or "retry" (the pointer
    is not at `encoder.index_version` -- or there is an index but no encoder -- so nothing was written).
    Upserts are encoded with `encoder` in one batch, whether or not they turn out to supersede.
    """
    keys = IndexKeys(prefix)
    entries = [CatalogEntry.from_event(e) for e in events]
    expected = "" if encoder is None else str(encoder.index_version)
    delta_key = keys.delta(encoder.index_version) if encoder is not None else keys.delta(0)
    upserts = [e for e in entries if e.live]
    encoded = iter(encoder.encode(upserts) if encoder is not None else [])
    pipe = redis.pipeline(transaction=False)
    for entry in entries:
        delta = ""
        if encoder is not None:
            delta = json.dumps(next(encoded) if entry.live else _expire_entry(entry), separators=(",", ":"))
        record = entry.value().split(" ", 2)[2]
        pipe.eval(
            _APPLY,
            4,
            keys.catalog,
            keys.current,
            delta_key,
            keys.changes,
            entry.ad_id,
            entry.sequence,
            repr(entry.event_time),
            record,
            expected,
            delta,
            CHANGES_MAXLEN,
        )
    return [RETRY if r == -1 else SUPERSEDED if r == 0 else APPLIED for r in pipe.execute()]


def apply_item_event(redis, event: ItemEvent, encoder: ItemEncoder | None, prefix: str = DEFAULT_PREFIX) -> str:
    """One event; see `apply_item_events`."""
    return apply_item_events(redis, [event], encoder, prefix)[0]


def catalog_entry(redis, ad_id: int, prefix: str = DEFAULT_PREFIX) -> CatalogEntry | None:
    value = redis.hget(IndexKeys(prefix).catalog, ad_id)
    return None if value is None else CatalogEntry.parse(ad_id, value)


def changes_position(redis, prefix: str = DEFAULT_PREFIX) -> str:
    """The id of the newest catalogue change ("0-0" when none): take it *before* scanning the catalogue."""
    newest = redis.xrevrange(IndexKeys(prefix).changes, count=1)
    if not newest:
        return "0-0"
    entry_id = newest[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def read_catalog(
    redis, prefix: str = DEFAULT_PREFIX, live_only: bool = True, count: int = 10_000
) -> list[CatalogEntry]:
    """Every catalogue entry (HSCAN: not a point-in-time view; pair it with `changes_position`)."""
    out = []
    for ad_id, value in redis.hscan_iter(IndexKeys(prefix).catalog, count=count):
        entry = CatalogEntry.parse(ad_id, value)
        if entry.live or not live_only:
            out.append(entry)
    return out


def catch_up(redis, since: str, encoder: ItemEncoder, prefix: str = DEFAULT_PREFIX) -> int:
    """Append to the encoder's version delta every ad whose catalogue entry changed after `since`.

    Used right after a flip, for changes a rebuild's catalogue scan may have missed. Each push is
    conditional on the catalogue entry being unchanged since it was read (a newer writer already wrote
    its own delta entry, in order). Returns how many entries were pushed.
    """
    keys = IndexKeys(prefix)
    ad_ids = list(dict.fromkeys(int(fields[b"ad"]) for _, fields in redis.xrange(keys.changes, min=f"({since}")))
    if not ad_ids:
        return 0
    values = redis.hmget(keys.catalog, ad_ids)
    entries = [CatalogEntry.parse(a, v) for a, v in zip(ad_ids, values, strict=True) if v is not None]
    raw = {e.ad_id: v for e, v in zip(entries, [v for v in values if v is not None], strict=True)}
    live = [e for e in entries if e.live and fits_schema(e, encoder.schema)]
    deltas = {e.ad_id: d for e, d in zip(live, encoder.encode(live), strict=True)}
    deltas |= {e.ad_id: _expire_entry(e) for e in entries if not e.live}
    pipe = redis.pipeline(transaction=False)
    for ad_id, delta in deltas.items():
        pipe.eval(
            _PUSH_IF_UNCHANGED, 2, keys.catalog, keys.delta(encoder.index_version), ad_id, raw[ad_id], json.dumps(delta)
        )
    return sum(1 for r in pipe.execute() if r)


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
