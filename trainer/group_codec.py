"""Bytes for what trainer ranks exchange: JSON for structure, safetensors for tensors, never pickle.

torch.distributed's object collectives pickle their payload, and unpickling runs whatever a peer sent.
The ranks exchange a small set of known shapes instead: JSON scalars, lists, str- or int-keyed dicts, tensors,
and an allow-list of dataclasses and pydantic models (the training batch, events, the manifest, the
publish result). Anything else raises TypeError when encoded, and decoding never builds a type outside
the allow-list.

    blob = 8-byte little-endian JSON length | JSON tree | safetensors file of the tree's tensors
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from hsnn.features import InteractionFeatures, ItemBatch, TrainingBatch, UserBatch
from streaming.events import ImpressionEvent, ItemFeatures
from streaming.snapshots import Manifest
from trainer.publisher import PublishResult

_DATACLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (TrainingBatch, UserBatch, ItemBatch, InteractionFeatures, PublishResult)
}
_MODELS: dict[str, type[BaseModel]] = {cls.__name__: cls for cls in (ImpressionEvent, ItemFeatures, Manifest)}
_HEADER = struct.Struct("<Q")


def encode(obj: Any) -> bytes:
    """One blob for `obj`; TypeError names the first value outside the allowed shapes."""
    tensors: dict[str, torch.Tensor] = {}

    def tree(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().contiguous().cpu()
            return {"~tensor": key}
        if isinstance(value, list | tuple):
            return {"~list": [tree(v) for v in value], "tuple": isinstance(value, tuple)}
        if isinstance(value, dict):
            if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in value):
                raise TypeError("only str- or int-keyed dicts travel between ranks")
            return {"~dict": [[k, tree(v)] for k, v in value.items()]}
        if isinstance(value, BaseModel) and type(value).__name__ in _MODELS:
            return {"~model": type(value).__name__, "json": value.model_dump(mode="json")}
        if dataclasses.is_dataclass(value) and type(value).__name__ in _DATACLASSES:
            fields = {f.name: tree(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return {"~dataclass": type(value).__name__, "fields": fields}
        raise TypeError(f"{type(value).__name__} is not among the shapes trainer ranks exchange")

    document = json.dumps(tree(obj), separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(document)) + document + save_tensors(tensors)


def decode(blob: bytes) -> Any:
    """The value `encode` wrote; ValueError if the blob is not one."""
    if len(blob) < _HEADER.size:
        raise ValueError("group blob shorter than its header")
    (length,) = _HEADER.unpack_from(blob)
    if _HEADER.size + length > len(blob):
        raise ValueError("group blob truncated")
    document = json.loads(blob[_HEADER.size : _HEADER.size + length])
    tensors = load_tensors(bytes(blob[_HEADER.size + length :]))

    def value(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "~tensor" in node:
            return tensors[node["~tensor"]]
        if "~list" in node:
            items = [value(v) for v in node["~list"]]
            return tuple(items) if node.get("tuple") else items
        if "~dict" in node:
            return {k: value(v) for k, v in node["~dict"]}
        if "~model" in node:
            return _MODELS[node["~model"]].model_validate(node["json"])
        if "~dataclass" in node:
            cls = _DATACLASSES[node["~dataclass"]]
            return cls(**{k: value(v) for k, v in node["fields"].items()})
        raise ValueError(f"unknown node in group blob: {sorted(node)[:3]}")

    return value(document)


def to_tensor(blob: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(blob),) uint8, the form a collective carries."""
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)


def from_tensor(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.cpu().numpy().tobytes())
