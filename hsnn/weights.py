"""Weights I/O: tensors in safetensors, the config as JSON. Nothing is ever unpickled."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load, save_file
from torch import nn

from hsnn.config import FeatureSchema, HSNNConfig, MoNNConfig
from hsnn.model import HSNN
from hsnn.monn import MoNN

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
FORMAT_VERSION = 1


def save_model(model: HSNN | MoNN, directory: str | Path) -> list[Path]:
    """Write `model.safetensors` and `model.json` into `directory`; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "hsnn", "config": model.config.model_dump(mode="json"), "format_version": FORMAT_VERSION}
    if not isinstance(model, HSNN):  # a standalone MoNN also needs the feature schema it was built for
        meta |= {"kind": "monn", "features": model.schema.model_dump(mode="json")}
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    save_file(tensors, str(weights))
    config.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return [weights, config]


def load_model(directory: str | Path, device: str = "cpu") -> HSNN | MoNN:
    """Rebuild the model from its JSON config and load the safetensors weights (strict)."""
    directory = Path(directory)
    return model_from_bytes((directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes(), device)


def model_from_bytes(config: bytes, weights: bytes, device: str = "cpu") -> HSNN | MoNN:
    """`load_model` from the two files' bytes, so a caller can load exactly the bytes it has checksummed."""
    meta = json.loads(config)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported model format {meta.get('format_version')!r}")
    model: nn.Module
    if meta["kind"] == "hsnn":
        model = HSNN(HSNNConfig.model_validate(meta["config"]))
    elif meta["kind"] == "monn":
        model = MoNN(MoNNConfig.model_validate(meta["config"]), FeatureSchema.model_validate(meta["features"]))
    else:
        raise ValueError(f"unknown model kind {meta['kind']!r}")
    model.load_state_dict(load(weights), strict=True)
    return model.to(device).eval()
