"""Shared plumbing of the PyTorch encoders: device/precision choice, input checks, batching."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from retrieval.base import Encoder
from retrieval.images import open_image

logger = logging.getLogger(__name__)

ImageInput = Image.Image | str | os.PathLike | bytes | BinaryIO

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> bf16 on CUDA (fp16 without bf16 support), float32 on CPU; names like "bf16" accepted."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    return dtype


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def check_texts(texts: Sequence[str]) -> list[str]:
    """A list of str (a single str is rejected: it would be split into characters)."""
    if isinstance(texts, str):
        raise TypeError("encode_texts expects a sequence of strings, got a single str; wrap it in a list")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be str; items {bad[:10]} are not")
    return texts


class TorchEncoder(Encoder):
    """Encoder base for PyTorch models: accepts PIL images or image files/bytes, runs in inference mode."""

    model: torch.nn.Module
    dtype: torch.dtype
    image_transform: Callable[[Image.Image], torch.Tensor]

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """A PIL image, path, bytes or file -> float32 tensor (3, S, S); files go through ``open_image``."""
        if not isinstance(image, Image.Image):
            image = open_image(image, convert_rgb=False)  # the transform converts, as the backend expects
        return self.image_transform(image)

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """PIL images (or paths/bytes) -> L2-normalised float32 (N, D)."""
        check_batch_size(batch_size)
        if isinstance(images, (Image.Image, str, bytes, os.PathLike)):
            raise TypeError("encode_images expects a sequence of images; wrap a single image in a list")
        return super().encode_images(list(images), batch_size=batch_size)

    def _to_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = (
                tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            )
            raise ValueError(f"pixel_values must be a tensor (B, 3, S, S), got {shape}")
        return pixel_values.to(self.device, self.dtype, non_blocking=True)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.embed_dim), dtype=np.float32)
