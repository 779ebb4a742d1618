"""Test helpers: a real uvicorn server in a thread, a deterministic fake encoder, index building."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import uvicorn
from PIL import Image

from retrieval.base import Encoder, l2_normalize


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(app, *, timeout: float = 60.0) -> Iterator[str]:  # noqa: ANN001
    """Run ``app`` under uvicorn on 127.0.0.1 (free port) in a thread; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class _FakeTransform:
    """Picklable PIL -> (3, 8, 8) tensor."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class FakeEncoder(Encoder):
    """Deterministic tiny encoder: images by their downsampled pixels, texts by a seeded hash.

    Records every encoder call's batch size; ``delay_s`` simulates slow inference.
    """

    name = "fake-encoder"
    embed_dim = 8
    logit_scale = 100.0
    device = torch.device("cpu")
    mode = "internvl-c"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.image_transform = _FakeTransform()
        self.delay_s = delay_s
        self.calls: list[tuple[str, int]] = []
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 8 * 8, self.embed_dim, generator=gen)

    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        self.calls.append(("image", len(pixel_values)))
        time.sleep(self.delay_s)
        return l2_normalize(pixel_values.reshape(len(pixel_values), -1) @ self.proj)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.calls.append(("text", len(texts)))
        time.sleep(self.delay_s)
        rows = []
        for text in texts:
            seed = int.from_bytes(text.encode("utf-8", "surrogatepass")[:64].ljust(8, b"\0")[:8], "little")
            rows.append(torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(seed % 2**63)))
        return l2_normalize(torch.stack(rows)) if rows else np.zeros((0, self.embed_dim), np.float32)


def make_images(folder: Path, n: int = 6, size: tuple[int, int] = (32, 24)) -> list[Path]:
    """``n`` distinct solid-ish PNG images in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        arr[: size[1] // 2] = (i * 40 % 256, 255 - i * 30 % 256, i * 70 % 256)
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def build_index(index_dir: Path, encoder: Encoder, paths: Sequence[Path], root: Path | None = None):  # noqa: ANN201
    """A real ``index.Index`` of ``paths`` embedded with ``encoder``; returns it (saved)."""
    from index import Index
    from retrieval.images import open_image

    vecs = encoder.encode_images([open_image(p) for p in paths])
    index = Index.create(index_dir, encoder.embed_dim, model=encoder.name, mode=encoder.mode)
    rows = []
    for p in paths:
        row = {"path": str(Path(p).absolute())}
        if root is not None:
            row.update(
                root=str(root.absolute()), relpath=str(Path(p).absolute().relative_to(root.absolute()))
            )
        rows.append(row)
    index.add(vecs, rows)
    index.save()
    return index


def png_bytes(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
