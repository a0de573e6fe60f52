"""The wire format: one parser for every event record, and the dead-letter record that carries a bad one.

The trainer (impressions), the indexer (items), the simulator feed and the API's item-event endpoint all
go through `decode_impression` / `decode_item`, which either return a valid event or raise `MalformedEvent`
-- nothing else -- so a consumer loop needs a single `except MalformedEvent` to route bad bytes to the
dead-letter topic (`dead_letter_record`). Decoding is schema-independent: a record is accepted or rejected
the same way by every reader whatever model it serves (fitting the model is `streaming.validation`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from typing import Any, Literal

from pydantic import Field, ValidationError

from streaming.contracts import (
    MAX_RECORD_BYTES,
    SUPPORTED_SCHEMA_VERSIONS,
    Event,
    EventModel,
    ImpressionEvent,
    ItemEvent,
)

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class MalformedEvent(Exception):
    """A record that cannot be decoded into an event. `reason` is one human-readable line."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw

    def __repr__(self) -> str:
        return f"MalformedEvent({self.reason!r}, raw={len(self.raw)} bytes)"


# --------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------


def encode(event: Event) -> bytes:
    """Compact UTF-8 JSON. Absent optional fields are left out rather than written as null."""
    return event.model_dump_json(exclude_none=True).encode("utf-8")


def event_key(event: Event) -> bytes:
    """The Kafka record key: the ad id for item events (compaction key), the event id for impressions."""
    if isinstance(event, ItemEvent):
        return str(event.ad_id).encode("ascii")
    return event.event_id.encode("utf-8")


def decode_impression(raw: bytes) -> ImpressionEvent:
    """Parse one `hsnn.impressions` record value; raises MalformedEvent (only) if it is not a valid event."""
    return _decode(raw, ImpressionEvent)


def decode_item(raw: bytes) -> ItemEvent:
    """Parse one `hsnn.items` record value (also the API's item-event body); raises MalformedEvent (only)."""
    return _decode(raw, ItemEvent)


def _decode(raw: bytes, model: type[EventModel]) -> Any:
    # Only MalformedEvent may escape: the catch-all turns a parser bug into a dead letter, not a crash.
    fast = _decode_fast(raw, model)
    if fast is not None:
        return fast
    try:
        payload = _parse_json(raw)
        _check_version(payload, raw)
        return model.model_validate(payload)
    except MalformedEvent:
        raise
    except ValidationError as err:
        raise MalformedEvent(f"invalid {model.__name__}: {summarise_validation_error(err)}", _as_bytes(raw)) from None
    except Exception as err:  # the contract is "MalformedEvent or a valid event", whatever went wrong
        raise MalformedEvent(
            f"could not decode {model.__name__}: {type(err).__name__}: {err}", _as_bytes(raw)
        ) from None


def _decode_fast(raw: object, model: type[EventModel]) -> Any | None:
    """The valid event straight from the bytes (pydantic's JSON parser, no Python dicts), or None.

    None sends the record down the strict path, which names what is wrong. The fast path accepts only
    what the strict path accepts too, with one exception: a key repeated within one JSON object, which
    the strict path refuses and this parser resolves to the last value (every reader in this system
    decodes with this function, so no two of them read such a record differently). That check costs more
    than the rest of the decode together.
    """
    if not isinstance(raw, (bytes, bytearray)) or not 0 < len(raw) <= MAX_RECORD_BYTES or _NON_FINITE.search(raw):
        return None
    try:
        event = model.model_validate_json(raw)
    except Exception:  # ValidationError, or anything else: the strict path decides and explains
        return None
    return event if "schema_version" in event.model_fields_set else None


_NON_FINITE = re.compile(rb"NaN|Infinity")  # JSON constants the strict parser refuses (inside a string too: rare)


def _as_bytes(raw: object) -> bytes:
    return bytes(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else repr(raw).encode("utf-8", "replace")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(raw: bytes) -> dict[str, Any]:
    if raw is None:
        raise MalformedEvent("empty record (null value)", b"")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedEvent(f"record value must be bytes, got {type(raw).__name__}", _as_bytes(raw))
    raw = bytes(raw)
    if not raw:
        raise MalformedEvent("empty record", raw)
    if len(raw) > MAX_RECORD_BYTES:
        raise MalformedEvent(f"record is {len(raw)} bytes, over the {MAX_RECORD_BYTES}-byte limit", raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedEvent(f"not UTF-8: invalid byte at position {err.start}", raw) from None
    try:
        payload = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise MalformedEvent(f"not JSON: {err.msg} at line {err.lineno} column {err.colno}", raw) from None
    except (ValueError, RecursionError) as err:
        raise MalformedEvent(f"not JSON: {err}", raw) from None
    if not isinstance(payload, dict):
        raise MalformedEvent(f"expected a JSON object, got {_json_type(payload)}", raw)
    return payload


def _check_version(payload: dict[str, Any], raw: bytes) -> None:
    if "schema_version" not in payload:
        raise MalformedEvent("missing schema_version", raw)
    version = payload["schema_version"]
    if type(version) is not int:
        raise MalformedEvent(f"schema_version must be an integer, got {_json_type(version)}", raw)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise MalformedEvent(
            f"unsupported schema_version {version} (this reader supports {sorted(SUPPORTED_SCHEMA_VERSIONS)})", raw
        )


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def summarise_validation_error(err: ValidationError, limit: int = 3) -> str:
    """A pydantic error as one line: `path: message (got value); ...`."""
    parts = []
    for item in err.errors()[:limit]:
        loc = ".".join(str(p) for p in item["loc"]) or "(event)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("missing", "extra_forbidden"):
            msg = "unknown field (not allowed)" if item["type"] == "extra_forbidden" else "required field missing"
            parts.append(f"{loc}: {msg}")
            continue
        got = item.get("input")
        if isinstance(got, (dict, list)) or item["type"] in ("value_error", "assertion_error"):
            parts.append(f"{loc}: {msg}")
        else:
            shown = repr(got)
            parts.append(f"{loc}: {msg} (got {shown[:40] + '...' if len(shown) > 40 else shown})")
    extra = err.error_count() - limit
    return "; ".join(parts) + (f"; and {extra} more error(s)" if extra > 0 else "")


# --------------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------------


class DeadLetter(EventModel):
    """A record that could not be processed, as published to a `*.dlq` topic."""

    dead_letter_version: Literal[1] = 1
    source_topic: str
    partition: int | None = None
    offset: int | None = None
    reason: str
    failed_at: float
    raw_base64: str = Field(description="The original bytes, or their first DEAD_LETTER_RAW_BYTES if truncated.")
    key_base64: str | None = None
    raw_length: int | None = Field(None, description="Length of the original value in bytes.")
    raw_sha256: str | None = Field(None, description="sha256 hex of the whole original value.")
    raw_truncated: bool = False

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_base64, validate=True)

    @property
    def key(self) -> bytes | None:
        return None if self.key_base64 is None else base64.b64decode(self.key_base64, validate=True)


DEAD_LETTER_RAW_BYTES = 16 << 10  # prefix of the original kept in a letter: far below any broker's message limit
DEAD_LETTER_REASON_CHARS = 1000


def dead_letter_record(
    raw: bytes,
    reason: str,
    source_topic: str,
    partition: int | None,
    offset: int | None,
    failed_at: float | None = None,
    key: bytes | None = None,
) -> bytes:
    """The DLQ record value: the original bytes (base64, so any bytes survive) plus where and why they failed.

    Only the first DEAD_LETTER_RAW_BYTES of the original (and of its key) are kept, with the full
    length and sha256: a letter that embedded a near-1 MiB record whole would exceed the broker's
    message size, fail every send and stall whoever waits for the DLQ acknowledgement. The source
    partition and offset still point at the whole record while it is retained.
    `partition`/`offset` are None for records that never had a Kafka position (e.g. a simulator feed).
    `key` is the original record key, kept so a replay can re-publish under the same key.
    """
    raw = bytes(raw)
    kept = raw[:DEAD_LETTER_RAW_BYTES]
    record = DeadLetter(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        reason=reason[:DEAD_LETTER_REASON_CHARS],
        failed_at=time.time() if failed_at is None else failed_at,
        raw_base64=base64.b64encode(kept).decode("ascii"),
        key_base64=None if key is None else base64.b64encode(bytes(key)[:DEAD_LETTER_RAW_BYTES]).decode("ascii"),
        raw_length=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
        raw_truncated=len(kept) < len(raw),
    )
    return record.model_dump_json(exclude_none=True).encode("utf-8")


def read_dead_letter(record: bytes) -> DeadLetter:
    """Parse a DLQ record (for replay tooling); raises ValueError if it is not one."""
    try:
        letter = DeadLetter.model_validate_json(record)
        _ = letter.raw, letter.key
    except (ValidationError, binascii.Error) as err:
        raise ValueError(f"not a dead-letter record: {err}") from None
    return letter
