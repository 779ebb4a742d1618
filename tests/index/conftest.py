"""Fixtures for the index tests: the tiny InternVL encoder, generated image folders, bad files."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "tests" / "fixtures" / "internvl_cg_tiny"
FORMATS = ("png", "jpg", "webp", "bmp", "gif", "tiff", "jpeg")
#: pixel limit the tests build with (the decompression bomb is above it)
TEST_MAX_PIXELS = 1_000_000


@pytest.fixture(scope="session")
def encoder():
    """The 56-px InternVL-C fixture model on CPU."""
    from retrieval import load_encoder

    return load_encoder(TINY_MODEL, device="cpu")


def make_image(path: Path, seed: int) -> Path:
    """A small distinct image (random blocks, 24-40 px) in the format of ``path``'s extension."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(24, 41)), int(rng.integers(24, 41))
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((h // 4 + 1, w // 4 + 1, 1), dtype=np.uint8))[:h, :w]
    arr = np.clip(arr.astype(int) + rng.integers(-20, 21, size=arr.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95) if path.suffix in (".jpg", ".jpeg") else Image.fromarray(
        arr
    ).save(path)
    return path


def make_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` images spread over nested sub-folders in all supported formats."""
    out = []
    for i in range(start, start + n):
        sub = folder / f"d{i % 3}" / (f"e{i % 2}" if i % 5 == 0 else "")
        out.append(make_image(sub / f"img{i:04d}.{FORMATS[i % len(FORMATS)]}", seed=i))
    return out


def _png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def make_bad_files(folder: Path) -> dict[str, str]:
    """Ten broken files of different kinds; returns ``{file name: expected reason}``."""
    folder.mkdir(parents=True, exist_ok=True)
    jpg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    png = _png_bytes(64, 64)
    files = {
        "truncated.jpg": (jpg.getvalue()[: len(jpg.getvalue()) // 2], "truncated"),
        "zero.jpg": (b"", "empty"),
        "document.jpg": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n", "undecodable"),
        "notes.png": (b"just some text, not an image\n", "undecodable"),
        "bomb.png": (_png_bytes(2000, 1000), "too_large"),
        "truncated.png": (png[: len(png) - 30], "truncated"),
        "noise.webp": (os.urandom(2048), "undecodable"),
        "page.gif": (b"<html><body>not a gif</body></html>", "undecodable"),
        "badheader.bmp": (b"BM" + zlib.compress(b"x" * 100), "undecodable"),
    }
    expected = {}
    for name, (data, reason) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = reason
    (folder / "dangling.jpg").symlink_to(folder / "does-not-exist.jpg")
    expected["dangling.jpg"] = "unreadable"
    return expected


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance per test session (2 CPUs, small object store, no dashboard).

    Ray >= 2.59 turns token authentication on for local instances: ``ray.init`` generates the token
    (``~/.ray/auth_token``), which subprocesses attaching with ``--ray-address`` read as well.
    """
    ray = pytest.importorskip("ray", reason="the Ray engine needs the [distributed] extra")
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
