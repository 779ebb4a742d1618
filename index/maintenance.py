"""Save-time maintenance: merging vector segments, (re)building FAISS from the stored vectors."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np

from index import faiss_index as fx
from index.faiss_index import faiss
from index.store import MetaStore
from index.vectors import VectorStore

logger = logging.getLogger(__name__)

#: vectors gathered at a time when re-adding everything
ADD_CHUNK = 65536
#: training sample cap (k-means cost grows with it)
MAX_TRAIN = 262_144


def plan_merge(live: Mapping[int, int]) -> list[int]:
    """Segments to merge, LSM style: the newest segments whose total outweighs half the one before.

    Keeps the number of segments logarithmic in the vector count and every vector rewritten only
    O(log n) times over the life of the index.
    """
    segs = sorted(live)
    if len(segs) < 2:
        return []
    tail, total = [segs[-1]], live[segs[-1]]
    for seg in reversed(segs[:-1]):
        if live[seg] > 2 * total:
            break
        tail.insert(0, seg)
        total += live[seg]
    return tail if len(tail) > 1 else []


def merge_segments(
    store: MetaStore,
    vectors: VectorStore,
    segs: list[int],
    new_seg: int,
    view: int,
    pending: Mapping[int, np.ndarray] | None,
) -> int:
    """Copy the live vectors of ``segs`` into segment ``new_seg`` and repoint their rows."""
    chosen = set(segs)
    live = [(i, s, o) for i, s, o in store.live_locations(view) if s in chosen]
    data = vectors.gather([(s, o) for _, s, o in live], pending)
    vectors.write(new_seg, data)
    store.move([(i, new_seg, off) for off, (i, _, _) in enumerate(live)])
    logger.debug("merged segments %s (%d live vectors) into %d", segs, len(live), new_seg)
    return len(live)


def train_sample(
    vectors: VectorStore,
    locs: list[tuple[int, int]],
    factory: str,
    dim: int,
    metric: str,
    pending: Mapping[int, np.ndarray] | None = None,
    seed: int = 0,
) -> np.ndarray | None:
    """The random training sample of ``locs`` (rows in id order) for ``factory``; None when it needs none.

    In-memory rebuilds and on-disk saves (:mod:`index.ondisk`) draw the same sample from the same rows."""
    probe = faiss.index_factory(int(dim), factory, fx.METRICS[metric])
    if probe.is_trained:
        return None
    nlist = int(re.match(r"IVF(\d+)", factory).group(1)) if factory.startswith("IVF") else 0
    n_train = min(len(locs), MAX_TRAIN, max(64 * nlist, 64 * 256))  # 64 points per centroid
    pick = np.sort(np.random.default_rng(seed).choice(len(locs), size=n_train, replace=False))
    return vectors.gather([locs[i] for i in pick], pending)


def rebuild_faiss(
    store: MetaStore,
    vectors: VectorStore,
    view: int,
    factory: str,
    dim: int,
    metric: str,
    pending: Mapping[int, np.ndarray] | None,
    seed: int = 0,
) -> faiss.Index:
    """A fresh FAISS index of ``factory`` over all rows visible at ``view`` (trained on a sample)."""
    live = store.live_locations(view)
    ids = np.asarray([i for i, _, _ in live], dtype=np.int64)
    locs = [(s, o) for _, s, o in live]
    sample = train_sample(vectors, locs, factory, dim, metric, pending, seed)
    index = fx.new_index(factory, dim, metric, sample)
    for start in range(0, len(locs), ADD_CHUNK):
        index.add_with_ids(
            vectors.gather(locs[start : start + ADD_CHUNK], pending), ids[start : start + ADD_CHUNK]
        )
    logger.info("built FAISS %s over %d vectors", factory, len(ids))
    return index
