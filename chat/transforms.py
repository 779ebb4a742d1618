"""The 448-style tile transform of the InternVL-Chat model cards (``build_transform``).

RGB conversion, bicubic resize to ``S x S`` (a no-op for tiles that are already square), ``ToTensor`` and
ImageNet mean/std normalisation. A plain class so it pickles into DataLoader workers.
"""

from __future__ import annotations

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
