"""The snapshot store: versioned model snapshots on a directory, written atomically, verified on read.

Layout under the root:
    versions/000000000007/model.safetensors, model.json, manifest.json, DONE
    PROMOTED                 JSON pointer {"version": 7, "promoted_at": ...} that readers poll

A version is written into a temporary directory, every file fsynced, then renamed into
place, and only then gets its DONE marker: a reader that sees DONE sees whole files. The
manifest lists the sha256 of every file and carries the sha256 of its own canonical content
(`manifest_sha256`), so a flipped byte in the offsets or a dropped `files` entry is caught too.
A reader loads exactly the bytes it checksummed, from the files the manifest lists, and refuses
a snapshot whose manifest does not list every file the model needs.

Eval metrics that are not finite (a diverged model's NaN NE) are stored as null, never as a
value JSON cannot carry, so such a manifest still loads (and the publisher's gate refuses it).

Writers are the publisher; readers are the indexer, the API and a restarting trainer,
which is why this lives in the core package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError

from hsnn.model import HSNN
from hsnn.monn import MoNN
from hsnn.weights import CONFIG_FILE, WEIGHTS_FILE, model_from_bytes, save_model

log = logging.getLogger("hsnn.snapshots")

MANIFEST_FILE = "manifest.json"
DONE_MARKER = "DONE"
POINTER_FILE = "PROMOTED"
MANIFEST_FORMAT = 2  # 2: self-checksummed (manifest_sha256); 1: before it (still read, with a warning)
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what loading needs: the manifest must list (and so checksum) each


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
    eval_metrics: dict[str, float | None] = Field(
        default_factory=dict, description="Held-out metrics; null where the value was not finite (NaN, inf)."
    )
    files: dict[str, str] = Field(default_factory=dict, description="File name -> sha256 hex digest.")
    manifest_sha256: str | None = Field(None, description="sha256 of `canonical_manifest(self)` (format 2).")

    @field_validator("eval_metrics", mode="before")
    @classmethod
    def _non_finite_is_null(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in value.items()}
        return value


def canonical_manifest(manifest: Manifest) -> bytes:
    """The bytes `manifest_sha256` covers: every other field, sorted keys, no whitespace, no NaN."""
    content = manifest.model_dump(mode="json", exclude={"manifest_sha256"})
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def manifest_digest(manifest: Manifest) -> str:
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


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
        extra_files: dict[str, bytes] | None = None,
    ) -> Manifest:
        """Write the next version atomically and return its manifest. Versions only grow.

        `extra_files` (name -> bytes, e.g. the trainer's optimizer state) go into the same version directory
        and are checksummed in the manifest like the model's files.
        """
        staging = self.tmp_dir / uuid.uuid4().hex
        staging.mkdir()
        try:
            written = save_model(model, staging)
            for name, data in (extra_files or {}).items():
                if Path(name).name != name or name in (MANIFEST_FILE, DONE_MARKER, *MODEL_FILES):
                    raise ValueError(f"invalid extra snapshot file name {name!r}")
                (staging / name).write_bytes(data)
                written.append(staging / name)
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
                manifest.manifest_sha256 = manifest_digest(manifest)
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
        """The manifest of a complete version, its own checksum verified; raises CorruptSnapshot otherwise."""
        directory = self.path(version)
        if not (directory / DONE_MARKER).exists():
            raise CorruptSnapshot(f"snapshot {version} is missing or incomplete (no {DONE_MARKER} marker)")
        try:
            manifest = Manifest.model_validate_json((directory / MANIFEST_FILE).read_bytes())
        except (OSError, ValidationError) as err:
            raise CorruptSnapshot(f"snapshot {version}: unreadable manifest: {str(err).splitlines()[0]}") from None
        if manifest.version != version:
            raise CorruptSnapshot(f"snapshot {version}: its manifest says version {manifest.version}")
        if manifest.format_version >= 2 or manifest.manifest_sha256 is not None:
            actual = manifest_digest(manifest)
            if manifest.manifest_sha256 != actual:
                raise CorruptSnapshot(
                    f"snapshot {version}: manifest content sha256 {actual[:12]}… != its manifest_sha256 "
                    f"{(manifest.manifest_sha256 or 'none')[:12]}… (the manifest was altered)"
                )
        else:
            log.warning("snapshot %d has a format-1 manifest without its own checksum", version)
        return manifest

    def _verified_files(self, version: int) -> tuple[Manifest, dict[str, bytes]]:
        """The manifest and the bytes of exactly the files it lists, each read once and checked against its sha256."""
        manifest = self.manifest(version)
        unlisted = [name for name in MODEL_FILES if name not in manifest.files]
        if unlisted:
            raise CorruptSnapshot(f"snapshot {version}: the manifest does not list {', '.join(unlisted)}")
        directory = self.path(version)
        contents: dict[str, bytes] = {}
        for name, expected in manifest.files.items():
            if Path(name).name != name or name in (MANIFEST_FILE, DONE_MARKER):
                raise CorruptSnapshot(f"snapshot {version}: the manifest lists an invalid file name {name!r}")
            try:
                data = (directory / name).read_bytes()
            except FileNotFoundError:
                raise CorruptSnapshot(f"snapshot {version}: {name} is missing") from None
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise CorruptSnapshot(f"snapshot {version}: {name} sha256 {actual[:12]}… != manifest {expected[:12]}…")
            contents[name] = data
        return manifest, contents

    def verify(self, version: int) -> Manifest:
        """Check the manifest's own checksum and every listed file's sha256; raise CorruptSnapshot on any difference."""
        return self._verified_files(version)[0]

    def load(self, version: int, device: str = "cpu") -> tuple[HSNN | MoNN, Manifest]:
        """Verify, then load the model from exactly the verified bytes (safetensors; never unpickled)."""
        model, manifest, _ = self.load_with_files(version, device)
        return model, manifest

    def load_with_files(self, version: int, device: str = "cpu") -> tuple[HSNN | MoNN, Manifest, dict[str, bytes]]:
        """`load`, plus the verified bytes of every file the manifest lists (the trainer reads its state there)."""
        manifest, contents = self._verified_files(version)
        try:
            model = model_from_bytes(contents[CONFIG_FILE], contents[WEIGHTS_FILE], device=device)
        except (ValueError, KeyError, RuntimeError, SafetensorError) as err:  # checksummed, yet unusable
            raise CorruptSnapshot(f"snapshot {version}: cannot load the model: {type(err).__name__}: {err}") from None
        return model, manifest, contents

    def promote(self, version: int) -> Pointer:
        """Point readers at `version` (atomic replace of the pointer file)."""
        self.manifest(version)  # must exist and be complete
        pointer = Pointer(version=version, promoted_at=time.time())
        _write_atomically(self.root / POINTER_FILE, json.dumps(pointer.__dict__))
        return pointer

    def read_pointer(self) -> Pointer | None:
        """The PROMOTED pointer (None if nothing was ever promoted); raises CorruptSnapshot if it is unreadable."""
        path = self.root / POINTER_FILE
        try:
            data = json.loads(path.read_bytes())
            return Pointer(version=int(data["version"]), promoted_at=float(data["promoted_at"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptSnapshot(f"the {POINTER_FILE} pointer under {self.root} is unreadable: {err}") from None

    def promoted(self) -> Pointer | None:
        """What readers should serve; an unreadable pointer reads as None (logged): readers keep what they serve."""
        try:
            return self.read_pointer()
        except CorruptSnapshot as err:
            log.error("%s; keeping what is served until the next promotion rewrites it", err)
            return None

    def prune(self, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete all but the newest `keep` versions, never the promoted one nor any in `protect`; returns the deleted.

        `protect` names versions still in use elsewhere (the snapshots behind the current and previous index).
        An unreadable pointer prunes nothing: the promoted version cannot be told apart.
        """
        if keep < 1:
            raise ValueError("retention must keep at least one version")
        try:
            promoted = self.read_pointer()
        except CorruptSnapshot as err:
            log.error("not pruning: %s", err)
            return []
        kept = set(protect) | ({promoted.version} if promoted is not None else set())
        doomed = [v for v in self.versions()[:-keep] if v not in kept]
        for version in doomed:
            shutil.rmtree(self.path(version))
        return doomed
