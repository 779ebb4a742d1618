"""retrieval.images.open_image: every PIL mode, EXIF orientation, and clear errors for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrieval.images import ImageDecodeError, ImageTooLarge, open_image, to_rgb


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "1", "CMYK", "I;16", "I", "F"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (12, 17, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (12, 17), dtype=np.uint16))
        assert image.mode == "I;16"
    elif mode in ("I", "F"):
        image = base.convert("L").convert(mode)
    else:
        image = base.convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (17, 12)


def test_rgba_alpha_dropped_not_composited() -> None:
    image = Image.new("RGBA", (4, 4), (10, 200, 30, 0))  # fully transparent, colour underneath
    out = open_image(_png_bytes(image))
    assert out.getpixel((0, 0)) == (10, 200, 30)


def test_exif_orientation_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    out = open_image(buf.getvalue())
    assert out.size == (20, 40)  # portrait, as a person sees it
    r, g, b = out.getpixel((10, 2))  # top edge is the former left strip
    assert b > 200 and r < 60


def test_empty_bytes_and_file(tmp_path) -> None:
    with pytest.raises(ImageDecodeError) as err:
        open_image(b"")
    assert err.value.reason == "empty"
    empty = tmp_path / "zero.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        open_image(empty)


def test_not_an_image(tmp_path) -> None:
    fake = tmp_path / "doc.jpg"
    fake.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    with pytest.raises(ImageDecodeError) as err:
        open_image(fake)
    assert err.value.reason == "undecodable" and "doc.jpg" in str(err.value)


def test_truncated_jpeg(tmp_path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError) as err:
        open_image(path)
    assert err.value.reason in ("truncated", "unreadable", "undecodable")


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ImageDecodeError) as err:
        open_image(tmp_path / "nope.png")
    assert err.value.reason == "unreadable"


def test_pixel_limit() -> None:
    data = _png_bytes(Image.new("L", (300, 300)))
    with pytest.raises(ImageTooLarge) as err:
        open_image(data, max_pixels=10_000)
    assert err.value.reason == "too_large" and "90000" in str(err.value)
    assert open_image(data, max_pixels=None).size == (300, 300)


def test_gif_first_frame() -> None:
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert open_image(buf.getvalue()).mode == "RGB"
