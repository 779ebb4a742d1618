"""Dynamic tiling against the golden chat fixtures (tiles.json / tiles.safetensors) and edge cases.

Pixel values are exact for every fixture image except ``tall.png``: Pillow 13 changed bicubic resampling,
so that one image differs from the fixtures' Pillow 10.4 values (README: up to 0.070 at 56 px, 0.0175 at
448 px). It is compared with the atol the fixture READMEs give (0.1) under Pillow >= 13 and exactly below.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import PIL
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from chat.tiling import (
    dynamic_tiles,
    load_image_tiles,
    target_ratios,
    tile_count,
    tile_grid,
    tile_images,
)
from chat.transforms import IMAGENET_MEAN, IMAGENET_STD, TileTransform
from retrieval.images import ImageDecodeError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHAT_FIXTURES = ["internvl_chat_tiny", "internvl_chat_internlm2_tiny", "internvl_chat_qwen2_tiny"]
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
TALL_ATOL = 0.1  # fixture README: "allow atol 0.1 for that image" (Pillow 13 bicubic change)


def _tiles_json(name: str) -> dict:
    return json.loads((FIXTURES / name / "tiles.json").read_text(encoding="utf-8"))


def _assert_pixels(actual: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    assert actual.shape == expected.shape, key
    if key == "tall" and PILLOW_13:
        diff = (actual - expected).abs().max().item()
        assert diff <= TALL_ATOL, f"{key}: max diff {diff}"
    else:
        assert torch.equal(actual, expected), f"{key}: max diff {(actual - expected).abs().max().item()}"


@pytest.mark.parametrize("name", CHAT_FIXTURES)
def test_grid_equals_tiles_json(name: str) -> None:
    grid = _tiles_json(name)["grid"]
    assert len(grid) == 210
    for g in grid:
        kw = dict(image_size=g["image_size"], min_num=g["min_num"], max_num=g["max_num"])
        assert tile_grid(g["width"], g["height"], **kw) == (g["cols"], g["rows"]), g
        assert g["cols"] * g["rows"] == g["num_blocks"]
        n = tile_count(g["width"], g["height"], use_thumbnail=g["use_thumbnail"], **kw)
        assert n == g["num_tiles"], g
        assert (n > g["num_blocks"]) == g["thumbnail_added"]


@pytest.mark.parametrize("name", CHAT_FIXTURES)
def test_dynamic_tiles_count_equals_tiles_json_at_56(name: str) -> None:
    for g in _tiles_json(name)["grid"]:
        if g["image_size"] != 56 or g["width"] * g["height"] > 2_000_000:
            continue
        image = Image.new("RGB", (g["width"], g["height"]), (10, 20, 30))
        tiles = dynamic_tiles(image, image_size=56, min_num=g["min_num"], max_num=g["max_num"],
                              use_thumbnail=g["use_thumbnail"])  # fmt: skip
        assert len(tiles) == g["num_tiles"], g
        assert all(t.size == (56, 56) for t in tiles)


@pytest.mark.parametrize("name", CHAT_FIXTURES)
def test_fixture_images_grid_and_pixels(name: str) -> None:
    info = _tiles_json(name)["fixture_images"]
    expected = load_file(str(FIXTURES / name / "tiles.safetensors"))
    for im in info:
        path = FIXTURES / name / im["file"]
        with Image.open(path) as raw:
            assert raw.mode == im["mode"] and list(raw.size) == im["size"]
        w, h = im["size"]
        assert tile_grid(w, h, image_size=im["image_size"], max_num=im["max_num"]) == (im["cols"], im["rows"])
        at = im["at_448"]
        assert tile_grid(w, h, image_size=448, max_num=at["max_num"]) == (at["cols"], at["rows"])
        pixels = load_image_tiles(path, image_size=im["image_size"], max_num=im["max_num"])
        assert pixels.dtype == torch.float32 and pixels.shape[0] == im["num_tiles"]
        _assert_pixels(pixels, expected[im["tensor"]], im["key"])


@pytest.mark.parametrize("name", CHAT_FIXTURES)
def test_448_summaries(name: str) -> None:
    info = _tiles_json(name)["fixture_images"]
    expected = load_file(str(FIXTURES / name / "tiles.safetensors"))
    for im in info:
        path = FIXTURES / name / im["file"]
        pixels = load_image_tiles(path, image_size=448, max_num=im["at_448"]["max_num"])
        assert list(pixels.shape) == im["at_448"]["shape"]
        prefix = f"pixel_values_448.{im['key']}"
        _assert_pixels(pixels[:, :, 8::16, 8::16], expected[f"{prefix}.sub16"], im["key"])
        _assert_pixels(pixels.mean(dim=(2, 3)), expected[f"{prefix}.channel_mean"], im["key"])
        _assert_pixels(pixels.std(dim=(2, 3)), expected[f"{prefix}.channel_std"], im["key"])


def _reference_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The model card's candidate list, written out literally."""
    ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )  # fmt: skip
    return sorted(ratios, key=lambda x: x[0] * x[1])


def test_target_ratio_order_equals_reference() -> None:
    for min_num in range(1, 7):
        for max_num in range(min_num, 41):
            assert list(target_ratios(min_num, max_num)) == _reference_ratios(min_num, max_num)


def test_tie_break_depends_on_image_size() -> None:
    # README: a 448x448 image at max_num 6 is 1x1 at image_size 448 but 2x2 at 56
    assert tile_grid(448, 448, image_size=448, max_num=6) == (1, 1)
    assert tile_grid(448, 448, image_size=56, max_num=6) == (2, 2)


@pytest.mark.parametrize("max_num", [1, 2, 6, 12, 24, 40])
def test_max_num_tiles_1_to_40(max_num: int) -> None:
    image = Image.new("RGB", (1000, 90), (200, 100, 50))
    cols, rows = tile_grid(*image.size, image_size=28, max_num=max_num)
    assert 1 <= cols * rows <= max_num
    pixels = load_image_tiles(image, image_size=28, max_num=max_num)
    assert pixels.shape == (tile_count(*image.size, image_size=28, max_num=max_num), 3, 28, 28)
    assert (cols, rows) == ((11, 1) if max_num >= 11 else (max_num, 1))  # aspect 11.1: widest grid allowed


def test_min_num_forces_more_tiles() -> None:
    assert tile_grid(100, 100, image_size=448, min_num=4, max_num=12) == (2, 2)


def test_tiles_row_major_and_thumbnail_last() -> None:
    image = Image.new("RGB", (112, 56))
    image.paste((255, 0, 0), (0, 0, 56, 56))
    image.paste((0, 0, 255), (56, 0, 112, 56))
    tiles = dynamic_tiles(image, image_size=56, max_num=6)
    assert len(tiles) == 3
    assert tiles[0].getpixel((28, 28)) == (255, 0, 0)
    assert tiles[1].getpixel((28, 28)) == (0, 0, 255)
    assert tiles[2].size == (56, 56)  # thumbnail of the whole image
    assert len(dynamic_tiles(image, image_size=56, max_num=6, use_thumbnail=False)) == 2
    assert len(dynamic_tiles(image, image_size=56, max_num=1)) == 1  # one block: no thumbnail


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD, strict=True)])


def test_rgba_alpha_dropped_not_composited() -> None:
    image = Image.new("RGBA", (56, 56), (200, 10, 30, 0))  # fully transparent, RGB kept underneath
    pixels = load_image_tiles(image, image_size=56, max_num=6)
    assert pixels.shape == (1, 3, 56, 56)
    torch.testing.assert_close(pixels[0, :, 5, 5], _normalised((200, 10, 30)))


def test_grayscale_replicated_to_three_channels() -> None:
    pixels = load_image_tiles(Image.new("L", (56, 56), 77), image_size=56, max_num=1)
    torch.testing.assert_close(pixels[0, :, 0, 0], _normalised((77, 77, 77)))


def test_path_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (120, 40), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    pixels = load_image_tiles(path, image_size=28, max_num=12)
    upright = image.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows: 40 x 120
    assert torch.equal(pixels, load_image_tiles(upright, image_size=28, max_num=12))
    assert not torch.equal(pixels, load_image_tiles(image, image_size=28, max_num=12))


def test_bytes_source_and_tile_images() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (100, 50), (1, 2, 3)).save(buf, format="PNG")
    pixels, num_patches = tile_images([buf.getvalue(), Image.new("RGB", (30, 30))], image_size=28, max_num=4)
    assert num_patches == [3, 1] and pixels.shape == (4, 3, 28, 28)


@pytest.mark.parametrize(
    "kwargs",
    [dict(width=0, height=10, image_size=448), dict(width=10, height=10, image_size=0),
     dict(width=10, height=10, image_size=448, min_num=0),
     dict(width=10, height=10, image_size=448, min_num=5, max_num=4)],
)  # fmt: skip
def test_bad_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        tile_grid(**kwargs)


def test_undecodable_file_raises_decode_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageDecodeError):
        load_image_tiles(bad, image_size=56, max_num=6)
    with pytest.raises(ValueError):
        tile_images([], image_size=56, max_num=6)


def test_transform_is_picklable_and_resizes() -> None:
    transform = pickle.loads(pickle.dumps(TileTransform(56)))
    out = transform(Image.new("RGB", (30, 70), (255, 255, 255)))
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], _normalised((255, 255, 255)))
