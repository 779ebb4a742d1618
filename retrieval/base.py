"""The encoder interface every backend (InternVL-C/G, OpenCLIP) implements.

PIL images and texts in, L2-normalised float32 ``(N, D)`` numpy arrays out. ``preprocess`` and
``encode_pixels`` are split so data loaders can decode and transform images in worker processes
and hand ready tensors to the model.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.errors import CaptioningNotSupportedError


class Encoder(abc.ABC):
    """Common interface of all image/text embedding backends."""

    #: short human-readable model name (e.g. ``"InternVL-14B-224px:internvl-c"``)
    name: str
    #: embedding width D
    embed_dim: int
    #: the model's temperature, already exponentiated (logits = logit_scale * cosine)
    logit_scale: float
    #: torch device the model runs on
    device: torch.device
    #: backend mode ("internvl-c", "internvl-g" or "openclip")
    mode: str
    #: picklable callable PIL image -> float32 tensor (3, S, S); holds no model, so data-loader
    #: workers can run it (EXIF orientation and RGB conversion included)
    image_transform: Callable[[Image.Image], torch.Tensor]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode, EXIF-oriented here) -> float32 tensor ``(3, S, S)`` on CPU."""
        return self.image_transform(image)

    @abc.abstractmethod
    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Preprocessed batch ``(B, 3, S, S)`` -> L2-normalised float32 ``(B, D)``."""

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Texts (any language) -> L2-normalised float32 ``(N, D)``."""

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """PIL images -> L2-normalised float32 ``(N, D)``."""
        out = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start : start + batch_size]])
            out.append(self.encode_pixels(batch))
        return np.concatenate(out, axis=0)

    #: whether :meth:`caption` works (a text decoder: InternVL checkpoints)
    can_caption: bool = False

    def caption(
        self,
        images: Sequence[Any],
        prompt: str = "English caption:",
        *,
        num_beams: int = 5,
        min_new_tokens: int = 8,
        max_new_tokens: int = 30,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Images -> one generated caption each (InternVL checkpoints: QLLaMA with the query tokens).

        Backends without a text decoder raise :class:`~retrieval.errors.CaptioningNotSupportedError`."""
        raise self._cannot_caption()

    def caption_pixels(
        self,
        pixel_values: torch.Tensor,
        prompt: str = "English caption:",
        *,
        num_beams: int = 5,
        min_new_tokens: int = 8,
        max_new_tokens: int = 30,
        **generate_kwargs: Any,
    ) -> list[str]:
        """:meth:`caption` of a preprocessed batch ``(B, 3, S, S)`` (e.g. from data-loader workers)."""
        raise self._cannot_caption()

    def _cannot_caption(self) -> CaptioningNotSupportedError:
        return CaptioningNotSupportedError(
            f"{self.name} ({self.mode}) cannot caption images: it has no text decoder "
            "(captions need an InternVL-C/G checkpoint)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.embed_dim}, device={self.device})"


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    """Row-wise L2 normalisation in float32, returned as a numpy array."""
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32, copy=False)
