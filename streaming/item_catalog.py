"""The live ad catalogue in Redis and the item events that change it (what the indexer writes per event).

Item events go through one Lua script that checks the ad's stored (sequence, event_time) with
`streaming.contracts.supersedes` semantics and writes the catalogue entry and the current index
version's delta entry at once. Keys are `streaming.index_layout`'s; versions are `streaming.index_store`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hsnn.config import FeatureSchema
from hsnn.features import ItemBatch
from hsnn.index import encode_catalog
from hsnn.model import HSNN
from streaming.contracts import ItemEvent
from streaming.index_layout import DEFAULT_PREFIX, IndexKeys
from streaming.tensors import stack_items
from streaming.validation import item_problems

CHANGES_MAXLEN = 1_000_000

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
