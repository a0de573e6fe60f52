"""The trainer's bookkeeping, pure and unit-tested without servers: hold-out rule, offsets, trained-ids file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path


def is_held_out(event_id: str, one_in: int) -> bool:
    """Whether an impression goes to the eval buffer instead of training.

    The rule: the first 8 bytes of blake2b(event_id), read as a big-endian integer, are 0 modulo
    `one_in`. It depends on the event id only (not on arrival order, partition or Python's salted
    `hash`), so every run and every restart holds out the same events. `one_in <= 0` holds out none.
    """
    if one_in <= 0:
        return False
    digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % one_in == 0


class OffsetBook:
    """Next offset to consume per (topic, partition): what goes into the snapshot manifest."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def set(self, topic: str, partition: int, next_offset: int) -> None:
        self._next[(topic, partition)] = next_offset

    def advance(self, topic: str, partition: int, offset: int) -> None:
        """Record that the record at `offset` was handled; offsets never move backwards."""
        key = (topic, partition)
        self._next[key] = max(self._next.get(key, 0), offset + 1)

    def forget(self, topic: str, partition: int) -> None:
        """Drop a partition (a rank of a group keeps only the partitions it owns)."""
        self._next.pop((topic, partition), None)

    def get(self, topic: str, partition: int) -> int | None:
        return self._next.get((topic, partition))

    def topic(self, topic: str) -> dict[int, int]:
        return {p: o for (t, p), o in self._next.items() if t == topic}

    def as_manifest(self) -> dict[str, dict[str, int]]:
        """topic -> partition (as a string, it is JSON) -> next offset."""
        out: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(self._next.items()):
            out.setdefault(topic, {})[str(partition)] = offset
        return out

    @classmethod
    def from_manifest(cls, offsets: Mapping[str, Mapping[str, int]]) -> OffsetBook:
        book = cls()
        for topic, partitions in offsets.items():
            for partition, offset in partitions.items():
                book.set(topic, int(partition), int(offset))
        return book


def truncate_lines(path: str | Path, keep: int) -> int:
    """Cut the file to its first `keep` complete lines (fsynced); returns the lines now in it.

    Lines written after the snapshot the trainer restarts from (and a torn last line) are
    removed, so the file lists exactly the events whose training the snapshot contains.
    """
    path = Path(path)
    if not path.exists():
        path.touch()
        return 0
    size = 0
    lines = 0
    with path.open("rb") as handle:
        for line in handle:
            if lines == keep or not line.endswith(b"\n"):
                break
            size += len(line)
            lines += 1
    with path.open("r+b") as handle:
        handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())
    return lines


def consumed_ids(path: str | Path) -> list[str]:
    """The event ids in a trained-ids file (one JSON string per line)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
