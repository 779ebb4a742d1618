"""The 448-style tile transform of the InternVL-Chat model cards (``build_transform``).

RGB conversion, bicubic resize to ``S x S`` (a no-op for tiles that are already square), ``ToTensor`` and
ImageNet mean/std normalisation. A plain class so it pickles into DataLoader workers.

:class:`ImageProcessorTransform` is the InternVL-Chat-V1-2 model card's preprocessing for folders with a
``preprocessor_config.json``: resize to ``S x S``, then transformers' ``CLIPImageProcessor``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TileTransform:
    """``PIL.Image -> (3, S, S) float32`` exactly as the reference ``build_transform(input_size=S)``."""

    def __init__(self, image_size: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        if image.size != size:  # T.Resize((S, S), BICUBIC); identity for already-square tiles
            image = TF.resize(image, [self.image_size, self.image_size],
                              interpolation=TF.InterpolationMode.BICUBIC)
        tensor = TF.to_tensor(image)  # (3, S, S) in [0, 1]
        return TF.normalize(tensor, mean=list(self.mean), std=list(self.std))

    def __repr__(self) -> str:
        return f"TileTransform(image_size={self.image_size})"


def build_transform(image_size: int) -> TileTransform:
    """The model card's ``build_transform(input_size)``."""
    return TileTransform(image_size)


def _clip_processor_class() -> Any:
    """transformers' PIL/numpy ``CLIPImageProcessor`` (the reference's, 4.37); the default class else."""
    try:
        from transformers import CLIPImageProcessorPil  # transformers 5: the torchvision one is the default

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/numpy one
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class ImageProcessorTransform:
    """``PIL.Image -> (3, S, S)`` as the V1-2 model card: ``image.resize((S, S))`` (PIL's default filter),
    then ``CLIPImageProcessor.from_pretrained(folder)`` (mean, std, resampling, crop from the folder's
    ``preprocessor_config.json``)."""

    def __init__(self, folder: str | os.PathLike, image_size: int) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.folder = str(folder)
        self.image_size = int(image_size)
        self.processor = _clip_processor_class().from_pretrained(self.folder)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = image.resize((self.image_size, self.image_size))
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(pixels[0], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"ImageProcessorTransform({self.folder!r}, image_size={self.image_size})"
