"""Reading checkpoints safely (safetensors, single file or sharded) and strict loading with clear errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from retrieval.errors import ModelLoadError, WeightMismatchError

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (one file, or the shards named by the index)."""
    folder = Path(folder)
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(p) for p in shards if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(absent)}")
        return shards
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
    raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {folder}{hint}")


def load_state_dict(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a model folder, as stored (dtype unchanged)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as fh:
                for key in fh.keys():
                    if key in state:
                        raise ModelLoadError(f"{file}: tensor {key!r} appears in more than one shard")
                    state[key] = fh.get_tensor(key)
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"{file}: cannot read safetensors file ({exc})") from exc
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`WeightMismatchError` listing missing, unexpected and wrongly shaped tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise WeightMismatchError(source, missing, unexpected, mismatched)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` after a readable name/shape check."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True, assign=assign)
