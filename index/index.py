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

In memory, one :class:`~index.state.IndexState` owns what an open index holds (FAISS and its search copy,
the pinned manifest, unsaved vectors, counters, the writer lock); the write side
(:class:`~index.persist.Saver`) and the read side (:class:`~index.query.Searcher`) both receive it, and
``Index`` delegates to them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from index import faiss_index as fx
from index import ondisk
from index.faiss_index import faiss
from index.filters import SearchFilters
from index.manifest import (  # noqa: F401 - the errors are re-exported for ``from index.index import ...``
    IndexFormatError,
    IndexLockedError,
    IndexMismatchError,
    check_compatible,
    new_manifest,
    read_manifest,
    write_manifest,
)
from index.persist import Saver
from index.query import Searcher
from index.state import IndexState
from index.store import SCHEMA_VERSION, MetaStore
from index.vectors import VectorStore

logger = logging.getLogger(__name__)

METRICS = tuple(fx.METRICS)


def _split_path(row: dict) -> dict:
    row = dict(row)
    if row.get("relpath") is None and row.get("path") is not None:
        path = os.path.abspath(os.fspath(row["path"]))
        row["root"], row["relpath"] = os.path.dirname(path), os.path.basename(path)
    return row


class Index:
    """Vector index with row metadata; see the module docstring for the on-disk format."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.dir = Path(folder).absolute()
        self.store = MetaStore(self.dir / "meta.sqlite")
        self.vectors = VectorStore(self.dir / "vectors", int(manifest["embed_dim"]))
        self._state = IndexState(self.dir, manifest, self.store, self.vectors)
        self._saver = Saver(self._state)
        self._query = Searcher(self._state)

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
    @property
    def _faiss(self) -> faiss.Index:
        """The CPU FAISS index (owned by the state; tests and tools inspect it)."""
        return self._state.faiss

    @property
    def _search_index(self) -> faiss.Index | None:
        """Its search copy (GPU, or the CPU index itself); None until the next search."""
        return self._state.search_index

    @_search_index.setter
    def _search_index(self, value: faiss.Index | None) -> None:
        self._state.search_index = value

    @property
    def manifest(self) -> dict:
        return dict(self._state.manifest)

    @property
    def dim(self) -> int:
        return self._state.dim

    @property
    def metric(self) -> str:
        return self._state.metric

    @property
    def generation(self) -> int:
        return self._state.gen

    @property
    def view_generation(self) -> int:
        return self._state.view

    def __len__(self) -> int:
        return self._state.count

    def __repr__(self) -> str:
        return f"Index(dir={str(self.dir)!r}, n={len(self)}, dim={self.dim}, faiss={self._state.factory!r})"

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the writer lock and this thread's database connection (unsaved changes are dropped)."""
        self._state.release_writer()
        self.store.close()

    def lock_for_writing(self) -> None:
        """Take the writer lock now (it is otherwise taken by the first change); ``IndexLockedError``
        when another process writes. Rolls back what an interrupted writer left uncommitted."""
        with self._state.lock:
            self._acquire_writer()

    def inherited_fds(self) -> list[int]:
        """Descriptors a forked worker process should close (the writer lock)."""
        fd = self._state.lock_fd
        return [fd] if fd is not None else []

    def _acquire_writer(self) -> None:
        s = self._state
        if s.writer:
            return
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise IndexLockedError(f"index at {self.dir} is being written by another process") from exc
        s.lock_fd = fd
        try:
            if self.store.migrate():
                logger.info("%s: metadata migrated to schema %d (captions)", self.dir, SCHEMA_VERSION)
        except ValueError as exc:
            s.lock_fd = None
            os.close(fd)
            raise IndexFormatError(str(exc)) from exc
        manifest = read_manifest(self.dir)
        n = self.store.rollback_after(int(manifest["generation"]))
        if n:
            logger.warning("%s: rolled back %d row changes of an interrupted save", self.dir, n)
        if manifest["generation"] != s.gen or n:
            s.load(manifest)
        s.writer = True
        # never reuse the id of a segment an interrupted save may have left referenced
        used = self.store.segments_in_use() | self.vectors.existing()
        s.pending.seg = max(s.pending.seg, max(used, default=-1) + 1)
        self._cleanup()

    def _cleanup(self, keep_faiss: str | None = None) -> None:
        """Drop what no reader of the current or previous generation (``keep_faiss``) can need any more."""
        self._saver.cleanup(keep_faiss)

    def _commit(self, what: str, save: Callable[[], str | None]) -> None:
        """Run ``save`` (a :class:`Saver` step, lock held) and clean up after it; a failure drops the
        unsaved changes and leaves this object a reader of the last committed state."""
        try:
            previous = save()
            if previous is not None:
                self._cleanup(previous)
        except BaseException:
            logger.error("%s of %s failed: its unsaved changes are dropped", what, self.dir)
            self._state.reset()
            raise

    # ------------------------------------------------------------------------- saving
    def save(self, *, full: bool = False, keep_structure: bool = False) -> None:
        """Commit all changes atomically (vectors, rows, FAISS, then the manifest last).

        The FAISS file is rewritten when the pending delta has grown large, when the index type
        calls for another structure (e.g. ``auto`` crossing to IVF, IVF lists outgrown), or with
        ``full=True``; otherwise readers replay the small delta from SQLite on open.
        ``keep_structure`` (bulk loads) keeps the current FAISS structure, so that a later
        ``save(full=True)`` trains the final one once on a sample of everything added.
        """
        with self._state.lock:
            self._acquire_writer()
            self._commit("saving", lambda: self._saver.save(full, keep_structure))

    def save_ondisk(self, *, map_blocks: ondisk.BlockMapper | None = None, seed: int = 0) -> bool:
        """Commit, then write the FAISS index as an on-disk IVF (see :mod:`index.ondisk`); True when done.

        IVF is trained once on the sample :meth:`rebuild` would draw (``seed``), so the result searches as
        the in-memory IVF; ``map_blocks`` runs the per-block adds (default: in this process; the Ray engine
        runs them as parallel tasks). Index types that are not IVF at this size get ``save(full=True)``.
        """
        with self._state.lock:
            self._acquire_writer()
            self.save(keep_structure=True)
            factory = self._saver.factory()
            if not factory.startswith("IVF"):
                logger.info("%s: %s is not an IVF index, saving it in memory", self.dir, factory)
                self.save(full=True)
                return False
            mapper = map_blocks or ondisk.run_local
            self._commit("the on-disk save", lambda: self._saver.save_ondisk(factory, mapper, seed))
            return True

    def rebuild(self, index_type: str | None = None) -> None:
        """Rebuild (and retrain) the FAISS index from the stored vectors, optionally changing its type."""
        with self._state.lock:
            self._acquire_writer()
            s = self._state
            if index_type is not None:
                fx.choose_factory(index_type, 0, self.dim)  # validates the name
                s.manifest = {**s.manifest, "index_type": index_type}
                s.changed = True
            s.rebuild_needed = True
            self.save(full=True)

    # ------------------------------------------------------------------------- reading
    def get(self, ids: Sequence[int]) -> list[dict | None]:
        """Row dicts (``id``, ``path``, ``root``, ``relpath``, size, mtime_ns, hash, width, height,
        added_at, extras) in the order of ``ids``; ``None`` for ids not in the index."""
        return self._query.get(ids)

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors (float16 precision) as float32 ``(n, D)``; ``KeyError`` for unknown ids."""
        return self._query.get_vectors(ids)

    def ids(self) -> np.ndarray:
        """All ids in the index, ascending."""
        return self._query.ids()

    def set_search_params(
        self,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank_factor: int | None = None,
    ) -> None:
        """Accuracy/speed knobs of approximate indexes (IVF ``nprobe``, HNSW ``efSearch``, PQ re-scoring
        pool ``rerank_factor`` x k)."""
        self._query.set_search_params(nprobe=nprobe, ef_search=ef_search, rerank_factor=rerank_factor)

    def search(
        self, queries: np.ndarray, k: int, *, filters: SearchFilters | dict | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
        """Top-``k`` rows for each query ``(Q, D)`` (or ``(D,)``), among the rows passing ``filters``.

        Returns ``ids (Q, k')`` int64, ``scores (Q, k')`` float32 (inner product, or squared L2
        distance for metric ``l2``) and per query a list of row dicts with ``score``, where
        ``k' = min(k, rows passing the filters)``; an approximate index that finds fewer pads with id -1 /
        NaN.
        """
        return self._query.search(queries, k, filters=filters)

    def range_candidates(
        self, queries: np.ndarray, radius: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FAISS ``range_search`` of the CPU index: ``(lims, scores, ids)`` of everything within ``radius``
        (inner product ``> radius``, or squared L2 ``< radius``); approximate for approximate indexes and
        unfiltered (removed HNSW ids may appear: callers check them against :meth:`ids`). PQ codes are too
        coarse for a radius: those indexes answer with the exactly re-scored top ``RANGE_KNN`` instead."""
        return self._query.range_candidates(queries, radius)

    def keyword_search(
        self, text: str, k: int, *, filters: SearchFilters | dict | None = None
    ) -> list[dict]:
        """Top-``k`` rows whose file name, relative path or caption contain the words of ``text``
        (:mod:`index.keyword`), best first, each with its keyword ``score``."""
        return self._query.keyword_search(text, k, filters=filters)

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
        s = self._state
        with s.lock:
            self._acquire_writer()
            start = self.store.max_id() + 1
            ids = np.arange(start, start + len(rows), dtype=np.int64)
            offsets = range(s.pending.n, s.pending.n + len(rows))
            try:
                self.store.insert(ids, rows, s.pending.seg, offsets, s.gen + 1)
            except sqlite3.IntegrityError as exc:
                raise ValueError(
                    f"a row with one of these paths is already indexed ({exc}); remove it first"
                ) from exc
            half = vectors.astype(np.float16)
            s.pending.append(half)
            s.add_vectors(half.astype(np.float32), ids)
            s.count += len(rows)
            s.delta += len(rows)
            s.changed = True
        return ids

    def remove(self, ids: Sequence[int]) -> int:
        """Remove rows by id (unknown ids are ignored). Returns how many were removed."""
        s = self._state
        with s.lock:
            self._acquire_writer()
            present = list(self.store.locations([int(i) for i in ids], s.view))
            if not present:
                return 0
            n = self.store.remove(present, s.gen + 1)
            s.forget(present)
            s.count -= n
            s.delta += n
            s.changed = True
        return n

    def set_captions(self, captions: Mapping[int, str]) -> int:
        """Store a caption per row id (committed at once, visible to every reader; ids not in the index
        are ignored). Returns how many rows were updated."""
        with self._state.lock:
            self._acquire_writer()
            present = self.store.locations([int(i) for i in captions], self._state.view)
            return self.store.set_captions((i, captions[i]) for i in captions if int(i) in present)

    def uncaptioned(self, limit: int = 1000, after: int = -1) -> list[dict]:
        """Up to ``limit`` file rows (images, whole videos) with id > ``after`` and no caption, by id."""
        return self.store.uncaptioned(self._state.view, limit=limit, after=after)

    def uncaptioned_count(self) -> int:
        """File rows of this view without a caption."""
        return self.store.uncaptioned_count(self._state.view)

    def captioned_count(self) -> int:
        """Rows of this view that have a caption."""
        return self.store.captioned_count(self._state.view)

    def touch(self, updates: Sequence[tuple[int, int, int]]) -> None:
        """Record new ``(id, size, mtime_ns)`` for rows whose content proved unchanged."""
        with self._state.lock:
            self._acquire_writer()
            self.store.touch(updates)

    # ------------------------------------------------------------------ files and failures (builders)
    def files(self, root: str) -> dict[str, tuple[int, int, int, str]]:
        """``relpath -> (id, size, mtime_ns, hash)`` of file rows (image, whole video) under ``root``."""
        return self.store.by_root(root, self._state.view)

    def file_parts(self, root: str) -> dict[str, list[int]]:
        """``relpath -> ids`` of the segment rows (``part > 0``) under ``root``."""
        return self.store.parts_by_root(root, self._state.view)

    def file_extras(self, root: str, like: str) -> dict[str, dict]:
        """``relpath -> extra fields`` of file rows under ``root`` whose extra JSON contains ``like``."""
        return self.store.extras_by_root(root, self._state.view, like)

    def failures(self, root: str) -> dict[str, tuple[int, int, str, str]]:
        """``relpath -> (size, mtime_ns, reason, message)`` of files under ``root`` that failed."""
        return self.store.failures(root)

    def set_failures(self, root: str, failures: Sequence[tuple[str, int, int, str, str]]) -> None:
        """Record ``(relpath, size, mtime_ns, reason, message)`` failures under ``root`` (replacing)."""
        with self._state.lock:
            self._acquire_writer()
            self.store.set_failures(root, failures)

    def clear_failures(self, root: str, relpaths: Sequence[str]) -> None:
        """Forget the failures of ``relpaths`` under ``root`` (they were read successfully)."""
        with self._state.lock:
            self._acquire_writer()
            self.store.clear_failures(root, relpaths)
