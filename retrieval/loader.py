"""``load_encoder``: pick the backend from a model folder's files and load it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from retrieval.base import Encoder
from retrieval.errors import ModelLoadError, UnknownModelTypeError

logger = logging.getLogger(__name__)

#: ``load_encoder("demo")`` resolves to this folder (built by the demo-model helper)
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"

INTERNVL_MODES = ("internvl-c", "internvl-g")
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``"demo"`` -> the bundled demo model folder; otherwise the path itself, which must be a folder."""
    if str(path) == "demo":
        if (
            not (DEMO_MODEL_DIR / "config.json").is_file()
            and not (DEMO_MODEL_DIR / OPENCLIP_CONFIG).is_file()
        ):
            raise FileNotFoundError(
                f"the demo model is not built yet: {DEMO_MODEL_DIR} has no config.json "
                "(it is produced by the demo-model training script)"
            )
        return DEMO_MODEL_DIR
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"model path is not a folder: {folder}")
    return folder


def detect_model_kind(folder: Path) -> str:
    """``"internvl"`` or ``"openclip"`` from the folder's files; :class:`UnknownModelTypeError` otherwise."""
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelLoadError(f"{config}: not a valid JSON object ({exc})") from exc
        if model_type == "internvl":
            return "internvl"
        if not (folder / OPENCLIP_CONFIG).is_file():
            raise UnknownModelTypeError(
                f"{config}: unsupported model_type {model_type!r}; supported: 'internvl' (InternVL-C/G) "
                f"or an OpenCLIP folder ({OPENCLIP_CONFIG} + {' or '.join(OPENCLIP_WEIGHTS)})"
            )
    if (folder / OPENCLIP_CONFIG).is_file():
        if not any((folder / name).is_file() for name in OPENCLIP_WEIGHTS):
            raise FileNotFoundError(
                f"{folder}: OpenCLIP config found but no weights ({' or '.join(OPENCLIP_WEIGHTS)})"
            )
        return "openclip"
    raise UnknownModelTypeError(
        f"{folder}: not a supported model folder "
        f"(no config.json with model_type 'internvl', no {OPENCLIP_CONFIG})"
    )


def load_encoder(
    path: str | os.PathLike,
    *,
    mode: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    transform: str = "retrieval",
) -> Encoder:
    """Load an encoder from a local model folder (Hugging Face layout) or ``"demo"``.

    InternVL folders take ``mode`` "internvl-c" (default) or "internvl-g"; OpenCLIP folders "openclip".
    ``device``: default CUDA when available; ``dtype``: default bf16/fp16 on CUDA, float32 on CPU.
    ``transform``: InternVL image preprocessing, "retrieval" (default) or "classification".
    """
    folder = resolve_model_path(path)
    kind = detect_model_kind(folder)
    wanted = mode.lower() if isinstance(mode, str) else mode
    if kind == "internvl":
        wanted = wanted or "internvl-c"
        if wanted not in INTERNVL_MODES:
            raise ValueError(
                f"mode {mode!r} is not valid for an InternVL model; expected one of {INTERNVL_MODES}"
            )
        from retrieval.internvl.encoder import load_internvl_encoder

        return load_internvl_encoder(folder, mode=wanted, device=device, dtype=dtype, transform=transform)
    if wanted not in (None, "openclip"):
        raise ValueError(f"mode {mode!r} is not valid for an OpenCLIP model; expected 'openclip'")
    from retrieval.openclip_backend import load_openclip_encoder

    return load_openclip_encoder(folder, device=device, dtype=dtype)
