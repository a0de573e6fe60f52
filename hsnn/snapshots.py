"""The snapshot store: versioned model snapshots on a directory, written atomically, verified on read.

Layout under the root:
    versions/000000000007/model.safetensors, model.json, manifest.json, DONE
    PROMOTED                 JSON pointer {"version": 7, "promoted_at": ...} that readers poll

A version is written into a temporary directory, every file fsynced, then renamed into
place, and only then gets its DONE marker: a reader that sees DONE sees whole files. The
manifest lists the sha256 of every file, and readers refuse a snapshot whose bytes differ.
Writers are the publisher; readers are the indexer, the API and a restarting trainer,
which is why this lives in the core package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.weights import load_model, save_model

MANIFEST_FILE = "manifest.json"
DONE_MARKER = "DONE"
POINTER_FILE = "PROMOTED"
MANIFEST_FORMAT = 1


class CorruptSnapshot(Exception):
    """A snapshot that is incomplete or whose files do not match their checksums."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = MANIFEST_FORMAT
    version: int = Field(ge=1)
    parent: int | None = None
    created_at: float
    event_time_watermark: float | None = Field(None, description="Newest event time trained on (epoch s).")
    offsets: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Kafka topic -> partition -> next offset to consume."
    )
    config: dict[str, Any] = Field(default_factory=dict)
    eval_metrics: dict[str, float] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="File name -> sha256 hex digest.")


@dataclass(frozen=True)
class Pointer:
    version: int
    promoted_at: float


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SnapshotStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.tmp_dir = self.root / "tmp"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.versions_dir / f"{version:012d}"

    def versions(self) -> list[int]:
        """Complete versions (DONE marker present), oldest first."""
        return sorted(
            int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit() and (p / DONE_MARKER).exists()
        )

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def write(
        self,
        model: HSNN | MoNN,
        *,
        offsets: dict[str, dict[str, int]] | None = None,
        event_time_watermark: float | None = None,
        eval_metrics: dict[str, float] | None = None,
        parent: int | None = None,
    ) -> Manifest:
        """Write the next version atomically and return its manifest. Versions only grow."""
        staging = self.tmp_dir / uuid.uuid4().hex
        staging.mkdir()
        try:
            written = save_model(model, staging)
            for path in written:
                _fsync_file(path)
            while True:
                version = max(self._all_version_numbers(), default=0) + 1
                manifest = Manifest(
                    version=version,
                    parent=parent,
                    created_at=time.time(),
                    event_time_watermark=event_time_watermark,
                    offsets=offsets or {},
                    config=json.loads((staging / "model.json").read_text()),
                    eval_metrics=eval_metrics or {},
                    files={p.name: sha256_file(p) for p in written},
                )
                _write_atomically(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2))
                try:
                    os.rename(staging, self.path(version))
                    break
                except OSError:  # another writer took this number first: take the next one
                    if not self.path(version).exists():
                        raise
            _fsync_dir(self.versions_dir)
            _write_atomically(self.path(version) / DONE_MARKER, str(version))
            return manifest
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _all_version_numbers(self) -> list[int]:
        return [int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit()]

    def manifest(self, version: int) -> Manifest:
        directory = self.path(version)
        if not (directory / DONE_MARKER).exists():
            raise CorruptSnapshot(f"snapshot {version} is missing or incomplete (no {DONE_MARKER} marker)")
        return Manifest.model_validate_json((directory / MANIFEST_FILE).read_text())

    def verify(self, version: int) -> Manifest:
        """Recompute every file's sha256 against the manifest; raise CorruptSnapshot on any difference."""
        manifest = self.manifest(version)
        directory = self.path(version)
        for name, expected in manifest.files.items():
            path = directory / name
            if not path.exists():
                raise CorruptSnapshot(f"snapshot {version}: {name} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise CorruptSnapshot(f"snapshot {version}: {name} sha256 {actual[:12]}… != manifest {expected[:12]}…")
        return manifest

    def load(self, version: int, device: str = "cpu") -> tuple[HSNN | MoNN, Manifest]:
        """Verify, then load the model (safetensors; never unpickled)."""
        manifest = self.verify(version)
        return load_model(self.path(version), device=device), manifest

    def promote(self, version: int) -> Pointer:
        """Point readers at `version` (atomic replace of the pointer file)."""
        self.manifest(version)  # must exist and be complete
        pointer = Pointer(version=version, promoted_at=time.time())
        _write_atomically(self.root / POINTER_FILE, json.dumps(pointer.__dict__))
        return pointer

    def promoted(self) -> Pointer | None:
        path = self.root / POINTER_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return Pointer(version=int(data["version"]), promoted_at=float(data["promoted_at"]))

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest `keep` versions, never the promoted one; returns what was deleted."""
        if keep < 1:
            raise ValueError("retention must keep at least one version")
        promoted = self.promoted()
        versions = self.versions()
        doomed = [v for v in versions[:-keep] if promoted is None or v != promoted.version]
        for version in doomed:
            shutil.rmtree(self.path(version))
        return doomed
