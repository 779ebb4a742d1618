"""The one owner of an open :class:`~index.index.Index`'s in-memory state.

The write side (:class:`index.persist.Saver`), the read side (:class:`index.query.Searcher`) and the
``Index`` itself all receive the same :class:`IndexState`: the FAISS index and its search copy, the
pinned manifest and generation, the unsaved vectors, the counters, the writer lock. No second copy of
any of it exists, so a new writer path changes the state here rather than duplicating it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index import faiss_index as fx
from index import ondisk
from index.manifest import read_manifest
from index.store import MetaStore
from index.vectors import PendingSegment, VectorStore

logger = logging.getLogger(__name__)

#: PQ indexes fetch this many times k candidates for exact re-scoring from the stored vectors. PQ codes
#: order near neighbours coarsely inside a dense cluster: at 1M clustered vectors (bench_index.py) a factor
#: of 10 kept recall@10 at 0.65, so the default is larger; tune with ``set_search_params(rerank_factor=)``
RERANK_FACTOR = 50


class IndexState:
    """Mutable state of one open index (see the module docstring); methods need :attr:`lock` held
    where they change it."""

    def __init__(self, folder: Path, manifest: dict, store: MetaStore, vectors: VectorStore) -> None:
        self.dir = Path(folder)
        self.store = store
        self.vectors = vectors
        self.lock = threading.RLock()
        self.writer = False
        self.lock_fd: int | None = None
        self.search_params: dict = {}
        self.rerank_factor = RERANK_FACTOR
        self.load(manifest)

    def load(self, manifest: dict) -> None:
        """Pin ``manifest``: read its FAISS file and replay the rows added / removed since it was written."""
        self.manifest = manifest
        self.gen = int(manifest["generation"])
        self.faiss = fx.read(self.dir / manifest["faiss_file"])
        self.factory = manifest["faiss_factory"]
        self.dead: set[int] = set()
        added, removed = self.store.delta(int(manifest["faiss_generation"]), self.gen)
        if added or removed:  # an on-disk IVF (index.ondisk) is shared with other readers: never changed
            self.faiss = ondisk.to_memory(self.faiss)
        if added:
            ids = np.fromiter((a for a, _, _ in added), dtype=np.int64, count=len(added))
            self.faiss.add_with_ids(self.vectors.gather([(s, o) for _, s, o in added]), ids)
        self.forget(removed)
        self.delta = len(added) + len(removed)
        self.count = self.store.count(self.gen)
        self.pending = PendingSegment(int(manifest["next_segment"]))
        self.changed = False
        self.rebuild_needed = False
        self.search_index = None
        self.apply_search_params()

    def reset(self) -> None:
        """Back to the last committed state (after a failed save), as a reader."""
        self.release_writer()
        self.vectors.forget()
        try:
            self.load(read_manifest(self.dir))
        except (OSError, ValueError) as exc:
            logger.error("cannot reload %s: %s", self.dir, exc)

    def release_writer(self) -> None:
        """Close the writer lock file (the lock is released) and become a reader."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        self.writer = False

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    @property
    def view(self) -> int:
        """Generation whose rows this object sees (its own unsaved changes included)."""
        return self.gen + 1 if self.writer else self.gen

    def add_vectors(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add to the FAISS index (copied into memory first when on disk) and to its GPU search copy."""
        self.faiss = ondisk.to_memory(self.faiss)
        self.faiss.add_with_ids(vectors, ids)
        gpu = self.search_index
        if gpu is None or gpu is self.faiss:
            return
        try:  # as to the CPU index, so the next search needs no new copy
            gpu.add_with_ids(vectors, ids)
        except RuntimeError as exc:  # e.g. GPU out of memory: copy the CPU index again when searching
            logger.warning("cannot add %d vectors to the GPU copy (%s): it is copied again", len(ids), exc)
            self.search_index = None

    def forget(self, ids: Sequence[int]) -> None:
        """Drop ids from the FAISS index (or mark them dead where the index cannot remove).

        faiss-gpu indexes cannot remove ids, so a GPU search copy is dropped here and copied again
        from the CPU index on the next search; dead ids (HNSW, never on a GPU) are filtered at search.
        """
        if not len(ids):
            return
        if fx.supports_remove(self.faiss):
            self.faiss = ondisk.to_memory(self.faiss)
            self.faiss.remove_ids(np.asarray(ids, dtype=np.int64))
            self.search_index = None
        else:
            self.dead.update(int(i) for i in ids)

    def apply_search_params(self) -> None:
        """Set the accuracy knobs on the FAISS index; the search copy is made again on the next search."""
        fx.set_search_params(self.faiss, 64, **self.search_params)
        self.search_index = None
