"""Dynamic high-resolution tiling of the InternVL-Chat model cards.

An image is resized to the ``cols x rows`` grid of ``image_size`` tiles whose aspect ratio is closest to its
own (``find_closest_aspect_ratio``, tie-break included), cut into tiles row-major, and, when the grid has more
than one tile, followed by a thumbnail of the whole image. Reproduces the reference ``dynamic_preprocess`` /
``load_image`` bit for bit (same candidate order, same float arithmetic, PIL's default resize filter).
Checkpoints without dynamic tiling (``dynamic_image_size: false``) get one ``S x S`` tile of the whole image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import BinaryIO

import torch
from PIL import Image

from chat.transforms import TileTransform
from retrieval.images import open_image, to_rgb

logger = logging.getLogger(__name__)

ImageSource = Image.Image | str | os.PathLike | bytes | BinaryIO


def _check_args(image_size: int, min_num: int, max_num: int) -> None:
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if int(min_num) < 1:
        raise ValueError(f"min_num must be >= 1, got {min_num}")
    if int(max_num) < int(min_num):
        raise ValueError(f"max_num ({max_num}) must be >= min_num ({min_num})")


@lru_cache(maxsize=64)
def target_ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Candidate grids ``(cols, rows)`` with ``min_num <= cols*rows <= max_num``, in the reference's order.

    The reference builds ``set((i, j) for n in range(min_num, max_num + 1) for i in 1..n for j in 1..n
    if min_num <= i*j <= max_num)`` and sorts it by area (stable, so equal areas keep the set's iteration
    order). Inserting the distinct pairs into a set in the order of their first appearance gives the very
    same set (and iteration order) in O(max_num^2) instead of O(max_num^3).
    """
    _check_args(1, min_num, max_num)
    ratios: set[tuple[int, int]] = set()

    def add(i: int, j: int) -> None:
        if min_num <= i * j <= max_num:
            ratios.add((i, j))

    for i in range(1, min_num + 1):  # n == min_num: every pair with i, j <= min_num
        for j in range(1, min_num + 1):
            add(i, j)
    for n in range(min_num + 1, max_num + 1):  # pairs first seen at n have max(i, j) == n
        for i in range(1, n):
            add(i, n)
        for j in range(1, n + 1):
            add(n, j)
    return tuple(sorted(ratios, key=lambda x: x[0] * x[1]))


def find_closest_aspect_ratio(
    aspect_ratio: float, ratios: Sequence[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The reference's choice: smallest ``|aspect - cols/rows|``; on an exact tie the later (larger) grid
    wins only if the image area exceeds half the grid's pixel area."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def tile_grid(
    width: int, height: int, *, image_size: int, min_num: int = 1, max_num: int = 12
) -> tuple[int, int]:
    """Grid ``(cols, rows)`` that an image of ``width x height`` pixels is tiled into."""
    _check_args(image_size, min_num, max_num)
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
    return find_closest_aspect_ratio(
        width / height, target_ratios(int(min_num), int(max_num)), width, height, image_size
    )


def tile_count(
    width: int,
    height: int,
    *,
    image_size: int,
    min_num: int = 1,
    max_num: int = 12,
    use_thumbnail: bool = True,
) -> int:
    """Number of tiles :func:`dynamic_tiles` returns for a ``width x height`` image (thumbnail included)."""
    cols, rows = tile_grid(width, height, image_size=image_size, min_num=min_num, max_num=max_num)
    blocks = cols * rows
    return blocks + 1 if use_thumbnail and blocks != 1 else blocks


def dynamic_tiles(
    image: Image.Image, *, image_size: int, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Tiles of ``image`` (``image_size`` squares, row-major), plus a thumbnail when there is more than one.

    Resizing uses PIL's default filter (bicubic for RGB), as the reference ``image.resize`` does.
    """
    cols, rows = tile_grid(image.width, image.height, image_size=image_size, min_num=min_num, max_num=max_num)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for r in range(rows):
        for c in range(cols):
            box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
            tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def load_image_tiles(
    image: ImageSource,
    *,
    image_size: int,
    max_num: int,
    min_num: int = 1,
    use_thumbnail: bool = True,
    dynamic: bool = True,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The model card's ``load_image``: ``(n_tiles, 3, S, S)`` float32, ImageNet-normalised.

    ``image`` is a PIL image (converted to RGB like the reference: alpha dropped, not composited) or a
    path / bytes / file, opened with :func:`retrieval.images.open_image` (EXIF orientation applied; raises
    ``ImageDecodeError`` on bad input). ``dynamic=False`` (``dynamic_image_size: false``, InternVL-Chat-V1-2):
    one tile, the whole image through ``transform`` (its resize to ``S x S``), no thumbnail, whatever
    ``max_num`` is. ``transform`` defaults to the README's ``build_transform(image_size)``.
    """
    if isinstance(image, Image.Image):
        pil = to_rgb(image)
    else:
        pil = open_image(image)
    transform = transform or TileTransform(image_size)
    if not dynamic:
        return transform(pil)[None]
    tiles = dynamic_tiles(pil, image_size=image_size, min_num=min_num, max_num=max_num,
                          use_thumbnail=use_thumbnail)
    return torch.stack([transform(tile) for tile in tiles])


def tile_images(
    images: Sequence[ImageSource],
    *,
    image_size: int,
    max_num: int,
    min_num: int = 1,
    use_thumbnail: bool = True,
    dynamic: bool = True,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Tile several images: ``(pixel_values (sum n_i, 3, S, S), num_patches_list [n_i, ...])``.

    Tiles are concatenated in image order, the layout ``chat(pixel_values, num_patches_list=...)`` expects.
    ``dynamic`` and ``transform`` as in :func:`load_image_tiles`.
    """
    if len(images) == 0:
        raise ValueError("tile_images needs at least one image")
    transform = transform or TileTransform(image_size)
    tensors = [
        load_image_tiles(img, image_size=image_size, max_num=max_num, min_num=min_num,
                         use_thumbnail=use_thumbnail, dynamic=dynamic, transform=transform)
        for img in images
    ]
    return torch.cat(tensors), [int(t.shape[0]) for t in tensors]
