"""The index's Redis key layout and how tensors are stored in it (shared by `index_store` and `item_catalog`).

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

DEFAULT_PREFIX = "hsnn:"
DEFAULT_CHUNK_BYTES = 8 << 20

_DTYPES: dict[torch.dtype, str] = {torch.int64: "<i8", torch.float32: "<f4", torch.bool: "|b1"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}

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
