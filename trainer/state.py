"""The trainer's own state beside the weights: Adam moments, RNG, eval buffer. safetensors + JSON, never pickle.

A restart that loads only the weights continues with a fresh optimiser (its first steps differ from
those of an uninterrupted run) and an empty eval buffer (the next snapshot has no NE). Written into
the snapshot version directory next to the model, these files make kill -> resume reproduce the
uninterrupted run on the same stream.

    optimizer.safetensors   per-parameter tensors "state.<index>.<name>" (exp_avg, exp_avg_sq, step),
                            and "rng.torch" (the CPU generator state)
    trainer_state.json      param_groups (lr, betas, ...) and the eval buffer (event JSON + ad features)
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from streaming.events import ImpressionEvent, ItemFeatures, decode_impression
from streaming.snapshots import Manifest

log = logging.getLogger("hsnn.trainer")

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = 1


def dump_trainer_state(
    optimizer: torch.optim.Optimizer, eval_buffer: Iterable[tuple[ImpressionEvent, ItemFeatures]]
) -> dict[str, bytes]:
    """File name -> bytes for the snapshot directory."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    document = {
        "format": STATE_FORMAT,
        "optimizer": type(optimizer).__name__,
        "param_groups": groups,
        "scalar_state": scalars,
        "eval_buffer": [
            {"event": event.model_dump(mode="json", exclude_none=True), "features": features.model_dump(mode="json")}
            for event, features in eval_buffer
        ],
    }
    return {
        OPTIMIZER_FILE: save_tensors(tensors),
        STATE_FILE: json.dumps(document, separators=(",", ":")).encode("utf-8"),
    }


def restore_trainer_state(
    optimizer: torch.optim.Optimizer, files: dict[str, bytes]
) -> list[tuple[ImpressionEvent, ItemFeatures]]:
    """Load what `dump_trainer_state` wrote into `optimizer` and the RNG; returns the eval buffer."""
    document = json.loads(files[STATE_FILE])
    if document.get("format") != STATE_FORMAT or document.get("optimizer") != type(optimizer).__name__:
        raise ValueError(f"trainer state {document.get('format')}/{document.get('optimizer')} does not fit")
    tensors = load_tensors(files[OPTIMIZER_FILE])
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = tensor
    for index, values in document["scalar_state"].items():
        per_param.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in document["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return [
        (decode_impression(json.dumps(item["event"]).encode()), ItemFeatures.model_validate(item["features"]))
        for item in document["eval_buffer"]
    ]


def restore_into(
    optimizer: torch.optim.Optimizer,
    eval_buffer: deque[tuple[ImpressionEvent, ItemFeatures]],
    files: dict[str, bytes],
    manifest: Manifest | None,
) -> None:
    """Adam moments, RNG and eval buffer from the snapshot: a resumed run continues the uninterrupted one.

    A snapshot without (or with unusable) trainer state leaves a fresh optimiser and an empty eval buffer.
    """
    if STATE_FILE not in files or OPTIMIZER_FILE not in files:
        if manifest is not None:
            log.warning("snapshot %d has no trainer state: fresh optimiser, no eval buffer", manifest.version)
        return
    try:
        eval_buffer.extend(restore_trainer_state(optimizer, files))
    except (ValueError, KeyError, RuntimeError) as err:
        log.warning("trainer state of the snapshot unusable (%s): fresh optimiser, empty eval buffer", err)
        optimizer.state.clear()
        eval_buffer.clear()
