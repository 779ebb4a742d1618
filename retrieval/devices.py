"""One device / precision / attention resolver for the whole project (encoders, chat, API, CLIs).

Spellings accepted everywhere (CLI flags, ``Settings``, ``load_encoder``, ``load_chat_model``):
``float32``/``fp32``/``float``, ``float16``/``fp16``/``half``, ``bfloat16``/``bf16``, and ``auto`` (or None):
bf16 on a GPU that computes it natively, fp16 on an older GPU, float32 on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from functools import lru_cache
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
AUTO = "auto"
DTYPE_CHOICES = (*DTYPE_NAMES, AUTO)
DTYPE_HELP = (
    "precision: float32|fp32, float16|fp16|half, bfloat16|bf16 or auto (default: bf16 on GPUs with native"
    " bf16, fp16 on older GPUs, float32 on the CPU)"
)
FLASH_ATTN_MIN_CAPABILITY = (8, 0)  # flash-attn 2: "only supports Ampere GPUs or newer"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` -> ``cuda`` when available, else ``cpu``; CUDA without a GPU is refused."""
    if device is None or (isinstance(device, str) and device.strip().lower() == AUTO):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1, auto)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def bf16_native(device: torch.device) -> bool:
    """True when ``device`` computes bf16 in hardware (Ampere+); emulated bf16 (T4, V100) counts as no."""
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4 has no including_emulation; fall back to the capability
        return torch.cuda.get_device_capability(device) >= (8, 0)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name or ``torch.dtype`` -> ``torch.dtype``; ``None`` / ``"auto"`` -> None (per device)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == AUTO:
            return None
        if name not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}")
        return DTYPE_NAMES[name]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    return dtype


def dtype_arg(value: str) -> str:
    """``argparse`` type for ``--dtype``: a spelling -> its canonical name (``"bfloat16"``, ``"auto"``)."""
    import argparse

    try:
        parsed = parse_dtype(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return AUTO if parsed is None else str(parsed).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> bf16 on native-bf16 CUDA, fp16 on other CUDA, float32 on CPU; names accepted."""
    parsed = parse_dtype(dtype)
    if parsed is not None:
        return parsed
    if device.type == "cuda":
        return torch.bfloat16 if bf16_native(device) else torch.float16
    return torch.float32


@lru_cache(maxsize=1)
def flash_attn_importable() -> bool:
    """flash-attn is installed *and* imports (a build for another torch/CUDA does not), checked once."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn")
    except (ImportError, OSError, RuntimeError) as exc:
        logger.warning("flash-attn is installed but cannot be imported (%s); using PyTorch SDPA", exc)
        return False
    return True


_warned_capability: set[tuple[int, int]] = set()


def flash_attn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn 2 applies: CUDA of compute capability >= 8.0, fp16/bf16, and an importable package."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not flash_attn_importable():
        return False
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < FLASH_ATTN_MIN_CAPABILITY:
        if capability not in _warned_capability:
            _warned_capability.add(capability)
            logger.warning(
                "flash-attn needs compute capability >= 8.0 (Ampere); this GPU has %d.%d: using PyTorch SDPA",
                *capability,
            )
        return False
    return True


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """transformers' ``attn_implementation``: ``"flash_attention_2"`` where usable, else ``"sdpa"``."""
    return "flash_attention_2" if flash_attn_usable(device, dtype) else "sdpa"


def describe(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> dict[str, Any]:
    """What the resolvers choose here, for logs, ``/health`` and ``scripts/gpu_check.py``."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    facts: dict[str, Any] = {
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "attention": attention_implementation(dev, dt),
        "bf16_native": bf16_native(dev),
    }
    if dev.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(dev)
        facts["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(dev))
    return facts
