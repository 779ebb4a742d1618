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
from retrieval.devices import resolve_device, resolve_dtype  # noqa: F401  (re-exported)
from retrieval.images import open_image

logger = logging.getLogger(__name__)

ImageInput = Image.Image | str | os.PathLike | bytes | BinaryIO

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
