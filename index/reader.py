"""Reading stage: files -> hashed, decoded, preprocessed tensors in DataLoader worker processes.

A bad file becomes an error record (``status="error"`` with a ``reason``), never an exception, so
one truncated JPEG cannot stop a build.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from index.walk import WorkItem
from retrieval.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image

logger = logging.getLogger(__name__)

#: files larger than this are not read into memory
DEFAULT_MAX_FILE_BYTES = 1 << 30


def content_hash(data: bytes) -> str:
    """Content fingerprint stored with each row (BLAKE2b, 128 bit, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ImageFileDataset(Dataset):
    """Work items -> records ``{i, status, pixels, size, mtime_ns, hash, width, height, reason, message}``.

    ``status`` is ``ok`` (pixels set), ``same`` (content hash equals ``expect_hash``: not decoded) or
    ``error`` (``reason`` from :class:`ImageDecodeError`, or ``unreadable`` / ``vanished`` / ``too_large``).
    """

    def __init__(
        self,
        items: Sequence[WorkItem],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        close_fds: Sequence[int] = (),
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.close_fds = tuple(close_fds)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        rec: dict = {"i": i, "status": "error", "pixels": None, "reason": None, "message": None}
        try:
            with open(item.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                rec.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
                if st.st_size > self.max_file_bytes:
                    return {
                        **rec,
                        "reason": "too_large",
                        "message": f"file has {st.st_size} bytes, over the limit of {self.max_file_bytes}",
                    }
                data = fh.read()
        except FileNotFoundError as exc:
            return {**rec, "reason": "vanished", "message": f"file disappeared during the run: {exc}"}
        except OSError as exc:
            return {**rec, "reason": "unreadable", "message": f"cannot read file: {exc}"}
        rec["hash"] = content_hash(data)
        if item.expect_hash is not None and rec["hash"] == item.expect_hash:
            return {**rec, "status": "same"}
        try:
            image = open_image(data, max_pixels=self.max_pixels)
            rec.update(width=image.width, height=image.height)
            pixels = self.transform(image)
        except ImageDecodeError as exc:
            message = str(exc).replace("<bytes>", item.path)
            return {
                **rec,
                "reason": exc.reason,
                "message": message if item.path in message else f"{item.path}: {message}",
            }
        except Exception as exc:  # noqa: BLE001 - a plugin bug on one file must not end the build
            logger.warning("%s: unexpected error while decoding: %r", item.path, exc)
            return {**rec, "reason": "undecodable", "message": f"{type(exc).__name__}: {exc}"}
        return {**rec, "status": "ok", "pixels": pixels}

    def worker_init(self, worker_id: int) -> None:
        """One thread per worker; drop inherited descriptors such as the index's writer lock."""
        torch.set_num_threads(1)
        for fd in self.close_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def collate(records: list[dict]) -> tuple[torch.Tensor | None, list[dict]]:
    """Stack the decoded images of a batch; records keep their order (pixels removed)."""
    pixels = [r.pop("pixels") for r in records]
    ok = [p for p in pixels if p is not None]
    return (torch.stack(ok) if ok else None), records


def make_loader(
    dataset: ImageFileDataset, batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """Batches in order; decoding in ``workers`` processes runs ahead of the consumer (encoder)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=dataset.worker_init if workers > 0 else None,
        persistent_workers=False,
    )
