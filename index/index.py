"""The ``Index``: FAISS vectors + SQLite metadata + float16 vector store, saved atomically.

Directory layout::

    manifest.json        format version, model, mode, dim, metric, index type, generation (commit point)
    meta.sqlite          rows (WAL), each tagged with the generation that added / removed it
                         (schema 2: ``part`` lets a video keep one row per segment; schema-1 files are
                         migrated by the first writer, see :mod:`index.store`)
    vectors/seg-*.npy    float16 vectors, memory-mappable, immutable segments
    faiss/<gen>.faiss    FAISS index (ids = SQLite ids) as of ``faiss_generation``
    faiss/<gen>.ivfdata  its inverted lists, for an on-disk IVF (``Index.save_ondisk``, :mod:`index.ondisk`)

A save writes vectors, SQLite rows (tagged ``generation + 1``) and possibly a new FAISS file, then
atomically replaces ``manifest.json``. Readers only see rows of the manifest's generation and apply
the small delta between ``faiss_generation`` and ``generation`` on open, so a crash at any instant
leaves the previous or the new index; the next writer rolls back anything newer than the manifest.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from index import faiss_index as fx
from index import ondisk
from index.manifest import (  # noqa: F401 - the errors are re-exported for ``from index.index import ...``
    IndexFormatError,
    IndexLockedError,
    IndexMismatchError,
    check_compatible,
    new_manifest,
    read_manifest,
    write_manifest,
)
from index.persist import SaveMixin
from index.query import RERANK_FACTOR, QueryMixin
from index.store import SCHEMA_VERSION, MetaStore
from index.vectors import PendingSegment, VectorStore

logger = logging.getLogger(__name__)

METRICS = tuple(fx.METRICS)


def _split_path(row: dict) -> dict:
    row = dict(row)
    if row.get("relpath") is None and row.get("path") is not None:
        path = os.path.abspath(os.fspath(row["path"]))
        row["root"], row["relpath"] = os.path.dirname(path), os.path.basename(path)
    return row


class Index(SaveMixin, QueryMixin):
    """Vector index with row metadata; see the module docstring for the on-disk format."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.dir = Path(folder).absolute()
        self._lock = threading.RLock()
        self._writer = False
        self._lock_fd: int | None = None
        self.store = MetaStore(self.dir / "meta.sqlite")
        self.vectors = VectorStore(self.dir / "vectors", int(manifest["embed_dim"]))
        self._search_params: dict = {}
        self._rerank_factor = RERANK_FACTOR
        self._load(manifest)

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        dim: int,
        *,
        metric: str = "ip",
        model: str | None = None,
        mode: str | None = None,
        index_type: str = "flat",
        memory_budget: int = fx.DEFAULT_MEMORY_BUDGET,
    ) -> Index:
        """Create an empty index in ``folder`` (created if needed; must not hold an index yet)."""
        folder = Path(folder).absolute()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        if index_type not in fx.INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; expected one of {fx.INDEX_TYPES}")
        if int(dim) < 1:
            raise ValueError(f"embedding dimension must be positive, got {dim}")
        if (folder / "manifest.json").exists():
            raise FileExistsError(f"an index already exists at {folder}; open it instead")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "faiss").mkdir(exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"index directory {folder} is not writable")
            MetaStore(folder / "meta.sqlite", create=True).close()
        except (PermissionError, sqlite3.OperationalError) as exc:
            raise PermissionError(f"cannot create an index in {folder}: {exc}") from exc
        factory, faiss_file = fx.FLAT, "faiss/00000000.faiss"
        fx.write(fx.new_index(factory, dim, metric), folder / faiss_file)
        manifest = new_manifest(dim, metric, model, mode, index_type, memory_budget, factory, faiss_file)
        write_manifest(folder, manifest)
        index = cls(folder, manifest)
        index._acquire_writer()
        return index

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        *,
        model: str | None = None,
        dim: int | None = None,
        mode: str | None = None,
    ) -> Index:
        """Open an existing index for reading (writing takes the writer lock on the first change).

        ``model`` / ``dim`` / ``mode``, when given, must match what the index was built with.
        """
        folder = Path(folder).absolute()
        manifest = read_manifest(folder)
        check_compatible(manifest, folder, model=model, dim=dim, mode=mode)
        for attempt in range(3):  # a concurrent save may retire the FAISS file between reads
            try:
                return cls(folder, manifest if attempt == 0 else read_manifest(folder))
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------- state
    def _load(self, manifest: dict) -> None:
        self._manifest = manifest
        self._gen = int(manifest["generation"])
        self._faiss = fx.read(self.dir / manifest["faiss_file"])
        self._factory = manifest["faiss_factory"]
        self._dead: set[int] = set()
        added, removed = self.store.delta(int(manifest["faiss_generation"]), self._gen)
        if added or removed:  # an on-disk IVF (index.ondisk) is shared with other readers: never changed
            self._faiss = ondisk.to_memory(self._faiss)
        if added:
            ids = np.fromiter((a for a, _, _ in added), dtype=np.int64, count=len(added))
            self._faiss.add_with_ids(self.vectors.gather([(s, o) for _, s, o in added]), ids)
        self._forget(removed)
        self._delta = len(added) + len(removed)
        self._count = self.store.count(self._gen)
        self._pending = PendingSegment(int(manifest["next_segment"]))
        self._changed = False
        self._rebuild_needed = False
        self._search_index = None
        self._apply_search_params()

    def _forget(self, ids: Sequence[int]) -> None:
        """Drop ids from the FAISS index (or mark them dead where the index cannot remove).

        faiss-gpu indexes cannot remove ids, so a GPU search copy is dropped here and copied again
        from the CPU index on the next search; dead ids (HNSW, never on a GPU) are filtered at search.
        """
        if not len(ids):
            return
        if fx.supports_remove(self._faiss):
            self._faiss = ondisk.to_memory(self._faiss)
            self._faiss.remove_ids(np.asarray(ids, dtype=np.int64))
            self._search_index = None
        else:
            self._dead.update(int(i) for i in ids)

    def _add_to_search_copy(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add to the GPU search copy as to the CPU index, so the next search needs no new copy."""
        gpu = self._search_index
        if gpu is None or gpu is self._faiss:
            return
        try:
            gpu.add_with_ids(vectors, ids)
        except RuntimeError as exc:  # e.g. GPU out of memory: copy the CPU index again when searching
            logger.warning("cannot add %d vectors to the GPU copy (%s): it is copied again", len(ids), exc)
            self._search_index = None

    @property
    def _view(self) -> int:
        """Generation whose rows this object sees (its own unsaved changes included)."""
        return self._gen + 1 if self._writer else self._gen

    @property
    def manifest(self) -> dict:
        return dict(self._manifest)

    @property
    def dim(self) -> int:
        return int(self._manifest["embed_dim"])

    @property
    def metric(self) -> str:
        return self._manifest["metric"]

    @property
    def generation(self) -> int:
        return self._gen

    @property
    def view_generation(self) -> int:
        return self._view

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"Index(dir={str(self.dir)!r}, n={self._count}, dim={self.dim}, faiss={self._factory!r})"

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the writer lock and this thread's database connection (unsaved changes are dropped)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._writer = False
        self.store.close()

    def lock_for_writing(self) -> None:
        """Take the writer lock now (it is otherwise taken by the first change); ``IndexLockedError``
        when another process writes. Rolls back what an interrupted writer left uncommitted."""
        with self._lock:
            self._acquire_writer()

    def inherited_fds(self) -> list[int]:
        """Descriptors a forked worker process should close (the writer lock)."""
        return [self._lock_fd] if self._lock_fd is not None else []

    def _acquire_writer(self) -> None:
        if self._writer:
            return
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise IndexLockedError(f"index at {self.dir} is being written by another process") from exc
        self._lock_fd = fd
        try:
            if self.store.migrate():
                logger.info("%s: metadata migrated to schema %d (captions)", self.dir, SCHEMA_VERSION)
        except ValueError as exc:
            self._lock_fd = None
            os.close(fd)
            raise IndexFormatError(str(exc)) from exc
        manifest = read_manifest(self.dir)
        n = self.store.rollback_after(int(manifest["generation"]))
        if n:
            logger.warning("%s: rolled back %d row changes of an interrupted save", self.dir, n)
        if manifest["generation"] != self._gen or n:
            self._load(manifest)
        self._writer = True
        # never reuse the id of a segment an interrupted save may have left referenced
        used = self.store.segments_in_use() | self.vectors.existing()
        self._pending.seg = max(self._pending.seg, max(used, default=-1) + 1)
        self._cleanup()

    # ---------------------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, rows: Sequence[dict]) -> np.ndarray:
        """Add ``(n, D)`` vectors with one metadata dict each (``path`` or ``root`` + ``relpath``,
        optional size, mtime_ns, hash, width, height, any JSON-able extras). Returns the new ids."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        if len(rows) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(rows)} rows")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinite values")
        if len(vectors) and np.abs(vectors).max() > np.finfo(np.float16).max:
            raise ValueError("vector values exceed the float16 range of the vector store (normalise them)")
        if not len(rows):
            return np.zeros(0, dtype=np.int64)
        rows = [_split_path(r) for r in rows]
        with self._lock:
            self._acquire_writer()
            start = self.store.max_id() + 1
            ids = np.arange(start, start + len(rows), dtype=np.int64)
            offsets = range(self._pending.n, self._pending.n + len(rows))
            try:
                self.store.insert(ids, rows, self._pending.seg, offsets, self._gen + 1)
            except sqlite3.IntegrityError as exc:
                raise ValueError(
                    f"a row with one of these paths is already indexed ({exc}); remove it first"
                ) from exc
            half = vectors.astype(np.float16)
            self._pending.append(half)
            stored = half.astype(np.float32)
            self._faiss = ondisk.to_memory(self._faiss)
            self._faiss.add_with_ids(stored, ids)
            self._add_to_search_copy(stored, ids)
            self._count += len(rows)
            self._delta += len(rows)
            self._changed = True
        return ids

    def remove(self, ids: Sequence[int]) -> int:
        """Remove rows by id (unknown ids are ignored). Returns how many were removed."""
        with self._lock:
            self._acquire_writer()
            present = list(self.store.locations([int(i) for i in ids], self._view))
            if not present:
                return 0
            n = self.store.remove(present, self._gen + 1)
            self._forget(present)
            self._count -= n
            self._delta += n
            self._changed = True
        return n

    def set_captions(self, captions: Mapping[int, str]) -> int:
        """Store a caption per row id (committed at once, visible to every reader; ids not in the index
        are ignored). Returns how many rows were updated."""
        with self._lock:
            self._acquire_writer()
            present = self.store.locations([int(i) for i in captions], self._view)
            return self.store.set_captions((i, captions[i]) for i in captions if int(i) in present)

    def uncaptioned(self, limit: int = 1000, after: int = -1) -> list[dict]:
        """Up to ``limit`` file rows (images, whole videos) with id > ``after`` and no caption, by id."""
        return self.store.uncaptioned(self._view, limit=limit, after=after)

    def uncaptioned_count(self) -> int:
        """File rows of this view without a caption."""
        return self.store.uncaptioned_count(self._view)

    def captioned_count(self) -> int:
        """Rows of this view that have a caption."""
        return self.store.captioned_count(self._view)

    def touch(self, updates: Sequence[tuple[int, int, int]]) -> None:
        """Record new ``(id, size, mtime_ns)`` for rows whose content proved unchanged."""
        with self._lock:
            self._acquire_writer()
            self.store.touch(updates)

    # ------------------------------------------------------------------ files and failures (builders)
    def files(self, root: str) -> dict[str, tuple[int, int, int, str]]:
        """``relpath -> (id, size, mtime_ns, hash)`` of file rows (image, whole video) under ``root``."""
        return self.store.by_root(root, self._view)

    def file_parts(self, root: str) -> dict[str, list[int]]:
        """``relpath -> ids`` of the segment rows (``part > 0``) under ``root``."""
        return self.store.parts_by_root(root, self._view)

    def file_extras(self, root: str, like: str) -> dict[str, dict]:
        """``relpath -> extra fields`` of file rows under ``root`` whose extra JSON contains ``like``."""
        return self.store.extras_by_root(root, self._view, like)

    def failures(self, root: str) -> dict[str, tuple[int, int, str, str]]:
        """``relpath -> (size, mtime_ns, reason, message)`` of files under ``root`` that failed."""
        return self.store.failures(root)

    def set_failures(self, root: str, failures: Sequence[tuple[str, int, int, str, str]]) -> None:
        """Record ``(relpath, size, mtime_ns, reason, message)`` failures under ``root`` (replacing)."""
        with self._lock:
            self._acquire_writer()
            self.store.set_failures(root, failures)

    def clear_failures(self, root: str, relpaths: Sequence[str]) -> None:
        """Forget the failures of ``relpaths`` under ``root`` (they were read successfully)."""
        with self._lock:
            self._acquire_writer()
            self.store.clear_failures(root, relpaths)
