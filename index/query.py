"""Read side of the :class:`~index.index.Index`: row look-ups, stored vectors, k-NN search.

Reads see the generation the object is pinned to (plus its own unsaved changes when it writes);
FAISS candidates are filtered against the SQLite rows of that generation, and compressed (PQ)
candidates are re-scored exactly with the stored float16 vectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from index import faiss_index as fx

#: PQ indexes fetch this many times k candidates for exact re-scoring from the stored vectors. PQ codes
#: order near neighbours coarsely inside a dense cluster: at 1M clustered vectors (bench_index.py) a factor
#: of 10 kept recall@10 at 0.65, so the default is larger; tune with ``set_search_params(rerank_factor=)``
RERANK_FACTOR = 50


class QueryMixin:
    """Lookup and search methods; the state they read is set up by ``Index``."""

    def get(self, ids: Sequence[int]) -> list[dict | None]:
        """Row dicts (``id``, ``path``, ``root``, ``relpath``, size, mtime_ns, hash, width, height,
        added_at, extras) in the order of ``ids``; ``None`` for ids not in the index."""
        found = self.store.get([int(i) for i in ids], self._view)
        return [found.get(int(i)) for i in ids]

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors (float16 precision) as float32 ``(n, D)``; ``KeyError`` for unknown ids."""
        ids = [int(i) for i in ids]
        locs = self.store.locations(ids, self._view)
        missing = [i for i in ids if i not in locs]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:10]}")
        return self.vectors.gather([locs[i] for i in ids], self._pending.as_map())

    def ids(self) -> np.ndarray:
        """All ids in the index, ascending."""
        return np.asarray([i for i, _, _ in self.store.live_locations(self._view)], dtype=np.int64)

    def set_search_params(
        self,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank_factor: int | None = None,
    ) -> None:
        """Accuracy/speed knobs of approximate indexes (IVF ``nprobe``, HNSW ``efSearch``, PQ re-scoring
        pool ``rerank_factor`` x k)."""
        if rerank_factor is not None and rerank_factor < 1:
            raise ValueError(f"rerank_factor must be >= 1, got {rerank_factor}")
        with self._lock:
            self._search_params = {"nprobe": nprobe, "ef_search": ef_search}
            self._rerank_factor = rerank_factor or RERANK_FACTOR
            self._apply_search_params()

    def _apply_search_params(self) -> None:
        fx.set_search_params(self._faiss, 64, **self._search_params)
        self._search_index = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
        """Top-``k`` rows for each query ``(Q, D)`` (or ``(D,)``).

        Returns ``ids (Q, k')`` int64, ``scores (Q, k')`` float32 (inner product, or squared L2
        distance for metric ``l2``) and per query a list of row dicts with ``score``, where
        ``k' = min(k, len(index))``; an approximate index that finds fewer pads with id -1 / NaN.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {np.shape(queries)}")
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or infinite values")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(q)
        kk = min(int(k), self._count)
        out_ids = np.full((len(q), kk), -1, dtype=np.int64)
        out_scores = np.full((len(q), kk), np.nan, dtype=np.float32)
        out_rows: list[list[dict]] = [[] for _ in range(len(q))]
        if kk == 0 or len(q) == 0:
            return out_ids, out_scores, out_rows
        with self._lock if self._writer else contextlib.nullcontext():
            dead = set(self._dead)
            fetch = kk + len(dead)
            if fx.needs_rerank(self._factory):
                fetch = max(fetch, kk * self._rerank_factor)
            fetch = min(fetch, int(self._faiss.ntotal))
            if self._search_index is None:
                self._search_index = fx.to_search_device(self._faiss)
            try:
                scores, cand = self._search_index.search(q, fetch)
            except RuntimeError:  # e.g. k over the GPU limit: the CPU index answers
                if self._search_index is self._faiss:
                    raise
                scores, cand = self._faiss.search(q, fetch)
            if fx.needs_rerank(self._factory):
                scores, cand = self._rerank(q, cand)
            rows = self.store.get(np.unique(cand[cand >= 0]).tolist(), self._view)
        for qi in range(len(q)):
            j = 0
            for rid, score in zip(cand[qi], scores[qi], strict=True):
                row = rows.get(int(rid)) if rid >= 0 and int(rid) not in dead else None
                if row is None:
                    continue
                out_ids[qi, j], out_scores[qi, j] = rid, score
                out_rows[qi].append({**row, "score": float(score)})
                j += 1
                if j == kk:
                    break
        return out_ids, out_scores, out_rows

    def _rerank(self, q: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for candidate ids from the stored vectors, re-sorted."""
        uniq = np.unique(cand[cand >= 0])
        locs = self.store.locations(uniq.tolist(), self._view)
        known = np.asarray([i for i in uniq.tolist() if i in locs], dtype=np.int64)
        if not len(known):
            return np.full(cand.shape, np.nan, dtype=np.float32), np.full_like(cand, -1)
        vecs = self.vectors.gather([locs[int(i)] for i in known], self._pending.as_map())
        pos = np.minimum(np.searchsorted(known, cand), len(known) - 1)
        ok = (cand >= 0) & (known[pos] == cand)
        gathered = vecs[pos]  # (Q, fetch, D)
        if self.metric == "ip":
            exact = np.einsum("qd,qkd->qk", q, gathered)
            exact = np.where(ok, exact, -np.inf)
            order = np.argsort(-exact, axis=1, kind="stable")
        else:
            exact = ((gathered - q[:, None, :]) ** 2).sum(-1)
            exact = np.where(ok, exact, np.inf)
            order = np.argsort(exact, axis=1, kind="stable")
        cand = np.where(ok, cand, -1)
        return np.take_along_axis(exact, order, 1).astype(np.float32), np.take_along_axis(cand, order, 1)
