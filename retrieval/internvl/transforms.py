"""The official InternVL-C/G image transforms (clip_benchmark ``build_transform``), picklable.

- ``retrieval``: square bicubic resize to S x S (aspect ratio not kept), ImageNet mean/std.
- ``classification``: bicubic resize of the shorter side to S, centre crop S x S, ImageNet mean/std.
EXIF orientation is applied and any PIL mode converted to RGB (alpha dropped, as the reference) first.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from retrieval.images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORM_KINDS = ("retrieval", "classification")


class InternVLImageTransform:
    """PIL image -> float32 tensor (3, S, S). Holds no model, so DataLoader workers can run it."""

    def __init__(self, kind: str = "retrieval", size: int = 224) -> None:
        if kind not in TRANSFORM_KINDS:
            raise ValueError(f"unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}")
        if size <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        self.kind = kind
        self.size = int(size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        image = to_rgb(ImageOps.exif_transpose(image))
        if self.kind == "retrieval":
            image = TF.resize(image, [self.size, self.size], interpolation=InterpolationMode.BICUBIC)
        else:
            image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC)
            image = TF.center_crop(image, [self.size, self.size])
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)

    def __repr__(self) -> str:
        return f"InternVLImageTransform(kind={self.kind!r}, size={self.size})"


def build_transform(kind: str = "retrieval", size: int = 224) -> InternVLImageTransform:
    """The reference ``build_transform(task, image_size)``: ``kind`` is "retrieval" or "classification"."""
    return InternVLImageTransform(kind, size)
