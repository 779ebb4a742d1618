"""Float16 vector store: immutable ``.npy`` segments, memory-mapped on read.

Each save appends one segment ``vectors/seg-<id>.npy`` (``(n, D)`` float16); SQLite rows point at
``(segment, offset)``. Segments are never modified, only merged into new ones and deleted once no
row refers to them, so the FAISS index can be retrained or rebuilt at any time without re-encoding.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write: Callable[[BinaryIO], None]
    """Write ``path`` via a temp file, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class VectorStore:
    """Segments of float16 vectors under ``folder``."""

    def __init__(self, folder: Path, dim: int) -> None:
        self.folder = Path(folder)
        self.dim = int(dim)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def path(self, seg: int) -> Path:
        return self.folder / f"seg-{seg:08d}.npy"

    def write(self, seg: int, vectors: np.ndarray) -> None:
        """Durably write segment ``seg`` (``(n, D)``, stored as float16)."""
        arr = np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1, self.dim)
        atomic_write(self.path(seg), lambda fh: np.save(fh, arr, allow_pickle=False))
        with self._lock:
            self._maps.pop(seg, None)

    def forget(self) -> None:
        """Drop cached memory maps (they are reopened on the next read)."""
        with self._lock:
            self._maps.clear()

    def segment(self, seg: int) -> np.ndarray:
        """Memory-mapped ``(n, D)`` float16 view of one segment."""
        with self._lock:
            arr = self._maps.get(seg)
            if arr is None:
                arr = np.load(self.path(seg), mmap_mode="r", allow_pickle=False)
                if arr.ndim != 2 or arr.shape[1] != self.dim:
                    raise ValueError(
                        f"vector segment {self.path(seg)} has shape {arr.shape}, expected (n, {self.dim})"
                    )
                self._maps[seg] = arr
            return arr

    def gather(
        self, locs: Sequence[tuple[int, int]], pending: Mapping[int, np.ndarray] | None = None
    ) -> np.ndarray:
        """Vectors at ``(segment, offset)`` locations as float32 ``(n, D)``, in the given order."""
        out = np.empty((len(locs), self.dim), dtype=np.float32)
        if not len(locs):
            return out
        loc = np.asarray(locs, dtype=np.int64).reshape(-1, 2)
        for seg in np.unique(loc[:, 0]):
            sel = np.flatnonzero(loc[:, 0] == seg)
            src = pending[int(seg)] if pending is not None and int(seg) in pending else self.segment(int(seg))
            offs = loc[sel, 1]
            order = np.argsort(offs, kind="stable")  # sequential reads from the memmap
            out[sel[order]] = np.asarray(src[offs[order]], dtype=np.float32)
        return out

    def existing(self) -> set[int]:
        """Segment ids present on disk."""
        out = set()
        for p in self.folder.glob("seg-*.npy"):
            try:
                out.add(int(p.stem[4:]))
            except ValueError:
                logger.warning("ignoring stray file in vector store: %s", p)
        return out

    def delete(self, segs: Sequence[int]) -> None:
        with self._lock:
            for seg in segs:
                self._maps.pop(seg, None)
                self.path(seg).unlink(missing_ok=True)
        for p in self.folder.glob(".seg-*.tmp"):
            p.unlink(missing_ok=True)


class PendingSegment:
    """Vectors added since the last save, in order: the next segment ``seg``, which the save writes.

    The index's one owner of its unsaved vectors: the write side appends and resets, the read side
    gathers from :meth:`as_map`.
    """

    def __init__(self, seg: int) -> None:
        self.seg = int(seg)
        self.n = 0
        self._parts: list[np.ndarray] = []
        self._cat: np.ndarray | None = None

    def append(self, vectors: np.ndarray) -> None:
        self._parts.append(vectors)
        self.n += len(vectors)
        self._cat = None

    def as_map(self) -> dict[int, np.ndarray] | None:
        """``{seg: (n, D) vectors}`` for :meth:`VectorStore.gather`, or None when nothing is pending."""
        if not self._parts:
            return None
        if self._cat is None:
            self._cat = np.concatenate(self._parts)
        return {self.seg: self._cat}

    def reset(self, seg: int) -> None:
        """Empty, with ``seg`` as the next segment (after a save)."""
        self.seg, self.n, self._parts, self._cat = int(seg), 0, [], None
