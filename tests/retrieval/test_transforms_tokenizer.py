"""InternVL preprocessing beyond the fixture: EXIF, every PIL mode, pickling; tokenizer edge cases."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from golden_helpers import TINY
from PIL import Image

from retrieval.internvl import InternVLTokenizer, build_transform


def _image(w: int = 45, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "1", "CMYK", "I;16", "I", "F"])
def test_any_mode(mode: str) -> None:
    image = _image()
    if mode == "I;16":
        image = Image.fromarray(np.random.default_rng(1).integers(0, 65535, (30, 45), dtype=np.uint16))
    elif mode in ("I", "F"):
        image = image.convert("L").convert(mode)
    else:
        image = image.convert(mode)
    out = build_transform("retrieval", 28)(image)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.std() > 0.05  # not a blank image (16-bit input rescaled, not clipped)


def test_exif_orientation_applied() -> None:
    image = _image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    stored = Image.open(io.BytesIO(buf.getvalue()))
    no_exif = stored.copy()
    no_exif.info.pop("exif")  # the same pixels as stored, without the orientation tag
    upright = no_exif.transpose(Image.Transpose.ROTATE_270)
    transform = build_transform("classification", 16)
    assert torch.equal(transform(stored), transform(upright))
    assert not torch.equal(transform(stored), transform(no_exif))


def test_classification_is_centre_crop_of_short_side_resize() -> None:
    image = _image(60, 20)
    out = build_transform("classification", 20)(image)
    direct = build_transform("retrieval", 20)(image.crop((20, 0, 40, 20)))
    assert torch.equal(out, direct)


def test_transform_pickles_and_rejects_bad_input() -> None:
    transform = pickle.loads(pickle.dumps(build_transform("retrieval", 24)))
    assert transform(_image()).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="unknown transform kind"):
        build_transform("detection", 24)
    with pytest.raises(TypeError, match="PIL image"):
        transform(np.zeros((4, 4, 3)))


@pytest.fixture(scope="module")
def tokenizer() -> InternVLTokenizer:
    return InternVLTokenizer.from_pretrained(TINY)


def test_long_text_truncated_keeping_bos_eos(tokenizer: InternVLTokenizer) -> None:
    ids = tokenizer(["word " * 500, "short"])
    assert ids.shape == (2, 80) and ids.dtype == torch.long
    assert ids[0, 0] == 1 and ids[0, 79] == 2 and (ids[0] > 0).all()
    assert ids[1, 0] == 1 and (ids[1] > 0).sum() < 10 and ids[1, (ids[1] > 0).sum() - 1] == 2


def test_empty_and_multilingual(tokenizer: InternVLTokenizer) -> None:
    texts = ["", "Ünïcødé ✓", "Привет, мир", "猫がいる 🐱", "\n\t  "]
    ids = tokenizer(texts)
    lengths = (ids > 0).sum(1)
    for row, n in zip(ids, lengths, strict=True):
        assert row[0] == 1 and row[n - 1] == 2 and (row[:n] > 0).all() and (row[n:] == 0).all()
    assert torch.equal(tokenizer(""), tokenizer([""]))
    assert tokenizer.encode("")[:1] == [1] and len(tokenizer.encode("")) > 2  # the "summarize:" prefix


def test_tokenizer_rejects_non_text(tokenizer: InternVLTokenizer) -> None:
    with pytest.raises(TypeError, match="must be str"):
        tokenizer([b"bytes"])
