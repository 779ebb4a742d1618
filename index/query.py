"""Read side of the :class:`~index.index.Index`: row look-ups, stored vectors, k-NN search.

Reads see the generation the object is pinned to (plus its own unsaved changes when it writes);
FAISS candidates are filtered against the SQLite rows of that generation, and compressed (PQ)
candidates are re-scored exactly with the stored float16 vectors. Metadata filters
(:mod:`index.filters`) are resolved to an id set in SQLite first: a small set is searched exactly over its
stored vectors, a larger one inside FAISS with an ``IDSelector`` (IVF ``nprobe`` / HNSW ``efSearch`` raised
so that the probed part of the index still holds enough selected vectors).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from index import faiss_index as fx
from index import keyword as kw
from index.faiss_index import faiss
from index.filters import IdSelector, SearchFilters, resolve, where_sql
from index.state import RERANK_FACTOR, IndexState

logger = logging.getLogger(__name__)

#: filters keeping at most this many rows are searched exactly over the selected stored vectors (at 768
#: dimensions that is ~30 MB of float16 and a few ms of matrix product per query)
EXACT_FILTER_MAX = 20_000
#: filtered IVF searches probe enough lists to see this many times the fetched candidates on average
FILTER_PROBE_FACTOR = 4
#: upper bound of the raised HNSW ``efSearch`` of filtered searches
MAX_FILTER_EF = 4096
#: neighbours per vector that range queries on PQ indexes consider (see :meth:`Searcher.range_candidates`)
RANGE_KNN = 32
#: resolved filters (id, segment, offset arrays) remembered per index object
FILTER_CACHE_SIZE = 8


class Searcher:
    """Lookup and search over an :class:`IndexState` (the ``Index`` delegates its read methods here)."""

    def __init__(self, state: IndexState) -> None:
        self.state = state
        self._filter_cache: OrderedDict = OrderedDict()
        self._derived_cache: tuple | None = None

    def get(self, ids: Sequence[int]) -> list[dict | None]:
        """Row dicts (``id``, ``path``, ``root``, ``relpath``, size, mtime_ns, hash, width, height,
        added_at, extras) in the order of ``ids``; ``None`` for ids not in the index."""
        found = self.state.store.get([int(i) for i in ids], self.state.view)
        return [found.get(int(i)) for i in ids]

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors (float16 precision) as float32 ``(n, D)``; ``KeyError`` for unknown ids."""
        ids = [int(i) for i in ids]
        locs = self.state.store.locations(ids, self.state.view)
        missing = [i for i in ids if i not in locs]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:10]}")
        return self.state.vectors.gather([locs[i] for i in ids], self.state.pending.as_map())

    def ids(self) -> np.ndarray:
        """All ids in the index, ascending."""
        return np.asarray([i for i, _, _ in self.state.store.live_locations(self.state.view)], dtype=np.int64)

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
        with self.state.lock:
            self.state.search_params = {"nprobe": nprobe, "ef_search": ef_search}
            self.state.rerank_factor = rerank_factor or RERANK_FACTOR
            self.state.apply_search_params()

    def search(
        self, queries: np.ndarray, k: int, *, filters: SearchFilters | dict | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
        """Top-``k`` rows for each query ``(Q, D)`` (or ``(D,)``), among the rows passing ``filters``.

        Returns ``ids (Q, k')`` int64, ``scores (Q, k')`` float32 (inner product, or squared L2
        distance for metric ``l2``) and per query a list of row dicts with ``score``, where
        ``k' = min(k, rows passing the filters)``; an approximate index that finds fewer pads with id -1 /
        NaN.
        """
        filters = SearchFilters.coerce(filters)
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.state.dim:
            raise ValueError(f"queries must have shape (Q, {self.state.dim}), got {np.shape(queries)}")
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or infinite values")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(q)
        if filters is not None:
            return self._search_filtered(q, int(k), filters)
        kk = min(int(k), self.state.count)
        out_ids = np.full((len(q), kk), -1, dtype=np.int64)
        out_scores = np.full((len(q), kk), np.nan, dtype=np.float32)
        out_rows: list[list[dict]] = [[] for _ in range(len(q))]
        if kk == 0 or len(q) == 0:
            return out_ids, out_scores, out_rows
        with self.state.lock if self.state.writer else contextlib.nullcontext():
            dead = set(self.state.dead)
            fetch = kk + len(dead)
            if fx.needs_rerank(self.state.factory):
                fetch = max(fetch, kk * self.state.rerank_factor)
            fetch = min(fetch, int(self.state.faiss.ntotal))
            if self.state.search_index is None:
                self.state.search_index = fx.to_search_device(self.state.faiss)
            try:
                scores, cand = self.state.search_index.search(q, fetch)
            except RuntimeError:  # e.g. k over the GPU limit: the CPU index answers
                if self.state.search_index is self.state.faiss:
                    raise
                scores, cand = self.state.faiss.search(q, fetch)
            if fx.needs_rerank(self.state.factory):
                scores, cand = self._rerank(q, cand)
            rows = self.state.store.get(np.unique(cand[cand >= 0]).tolist(), self.state.view)
        return self._collect(cand, scores, rows, dead, out_ids, out_scores, out_rows)

    def _collect(self, cand, scores, rows, dead, out_ids, out_scores, out_rows):  # noqa: ANN001,ANN202
        """Fill the outputs with the first visible candidates of each query."""
        kk = out_ids.shape[1]
        for qi in range(len(cand)):
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

    def _search_filtered(
        self, q: np.ndarray, k: int, filters: SearchFilters
    ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
        """:meth:`search` restricted to the rows passing ``filters``."""
        with self.state.lock if self.state.writer else contextlib.nullcontext():
            selected = self._resolve_cached(filters)
            kk = min(k, len(selected))
            out_ids = np.full((len(q), kk), -1, dtype=np.int64)
            out_scores = np.full((len(q), kk), np.nan, dtype=np.float32)
            out_rows: list[list[dict]] = [[] for _ in range(len(q))]
            if kk == 0:
                return out_ids, out_scores, out_rows
            if len(selected) <= EXACT_FILTER_MAX:
                scores, cand = self._exact_over(q, selected, kk)
            else:
                scores, cand = self._faiss_over(q, self._selector_for(selected), len(selected), kk)
            rows = self.state.store.get(np.unique(cand[cand >= 0]).tolist(), self.state.view)
        return self._collect(cand, scores, rows, set(), out_ids, out_scores, out_rows)

    def _resolve_cached(self, filters: SearchFilters) -> np.ndarray:
        """:func:`index.filters.resolve` at this object's view, remembered for the last
        :data:`FILTER_CACHE_SIZE` filters until the rows change (pages of one filtered query resolve once).
        SQLite's ``data_version`` changes with every commit of another connection (e.g. a writer moving
        rows to a compacted segment), this object's own changes move its view, count and delta."""
        cache = self._filter_cache
        version = self.state.store.conn().execute("PRAGMA data_version").fetchone()[0]
        key = (filters, self.state.view, self.state.count, self.state.delta, version)
        selected = cache.get(key)
        if selected is None:
            selected = resolve(self.state.store, filters, self.state.view)
            cache[key] = selected
            while len(cache) > FILTER_CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return selected

    def _exact_over(self, q: np.ndarray, selected: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` over the stored vectors of ``selected`` ``[id, seg, off]`` rows."""
        pending = self.state.pending.as_map()
        vecs = self._derived(selected, "vectors", lambda: self.state.vectors.gather(selected[:, 1:], pending))
        ids = selected[:, 0]
        # a few queries: numpy's own loop (no BLAS thread pool to wake, ~10x faster on a busy machine)
        dots = np.einsum("qd,nd->qn", q, vecs) if len(q) <= 8 else q @ vecs.T
        if self.state.metric == "ip":
            sims = dots
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        else:
            sims = np.maximum((q * q).sum(1)[:, None] - 2.0 * dots + (vecs * vecs).sum(1)[None, :], 0.0)
            order = np.argsort(sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, 1).astype(np.float32), ids[order]

    def _selector_for(self, selected: np.ndarray) -> IdSelector:
        """The FAISS selector of a resolved filter (kept with the cached resolution)."""
        return self._derived(selected, "selector", lambda: IdSelector(selected[:, 0]))

    def _derived(self, selected: np.ndarray, what: str, make):  # noqa: ANN001,ANN202
        """``make()`` for the resolved filter ``selected``, remembered for the latest one only: its selector
        (up to 64 MiB) or its gathered vectors (up to EXACT_FILTER_MAX x dim float32, 61 MB at 768)."""
        entry = self._derived_cache
        if entry is None or entry[0] is not selected:
            entry = self._derived_cache = (selected, {})
        value = entry[1].get(what)
        if value is None:
            value = entry[1][what] = make()
        return value

    def _faiss_over(
        self, q: np.ndarray, selector: IdSelector, n_selected: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of the CPU index restricted to ``n_selected`` ids by ``selector``."""
        fetch = k
        if fx.needs_rerank(self.state.factory):
            fetch = max(fetch, k * self.state.rerank_factor)
        fetch = min(fetch, n_selected)
        params = self._filter_params(selector, fetch, n_selected)
        scores, cand = self.state.faiss.search(q, fetch, params=params)
        if fx.needs_rerank(self.state.factory):
            scores, cand = self._rerank(q, cand)
        return scores, cand

    def _filter_params(self, selector: IdSelector, fetch: int, n_selected: int) -> faiss.SearchParameters:
        """Search parameters carrying the selector, with IVF nprobe / HNSW efSearch raised for its size."""
        try:
            ivf = faiss.extract_index_ivf(self.state.faiss)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            wanted = int(np.ceil(FILTER_PROBE_FACTOR * fetch * ivf.nlist / max(n_selected, 1)))
            nprobe = int(min(ivf.nlist, max(ivf.nprobe, wanted)))
            return faiss.SearchParametersIVF(sel=selector.sel, nprobe=nprobe)
        inner = fx._inner(self.state.faiss)
        if isinstance(inner, faiss.IndexHNSW):
            share = n_selected / max(int(self.state.faiss.ntotal), 1)
            ef = int(min(MAX_FILTER_EF, max(inner.hnsw.efSearch, np.ceil(fetch / share))))
            return faiss.SearchParametersHNSW(sel=selector.sel, efSearch=ef)
        return faiss.SearchParameters(sel=selector.sel)

    def range_candidates(
        self, queries: np.ndarray, radius: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FAISS ``range_search`` of the CPU index: ``(lims, scores, ids)`` of everything within ``radius``
        (inner product ``> radius``, or squared L2 ``< radius``); approximate for approximate indexes and
        unfiltered (removed HNSW ids may appear: callers check them against :meth:`ids`). PQ codes are too
        coarse for a radius: those indexes answer with the exactly re-scored top :data:`RANGE_KNN` instead."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if fx.needs_rerank(self.state.factory):
            ids, scores, _ = self.search(q, RANGE_KNN)
            with np.errstate(invalid="ignore"):
                within = (ids >= 0) & ((scores > radius) if self.state.metric == "ip" else (scores < radius))
            lims = np.concatenate([[0], np.cumsum(within.sum(1))]).astype(np.int64)
            return lims, scores[within], ids[within]
        with self.state.lock if self.state.writer else contextlib.nullcontext():
            try:
                lims, scores, ids = self.state.faiss.range_search(q, float(radius))
            except RuntimeError as exc:  # an index type without range search: exact over the stored vectors
                logger.info("FAISS %s has no range search (%s): exact search", self.state.factory, exc)
                flat = faiss.IndexIDMap2(faiss.IndexFlat(self.state.dim, fx.METRICS[self.state.metric]))
                live = self.ids()
                flat.add_with_ids(self.get_vectors(live), live)
                lims, scores, ids = flat.range_search(q, float(radius))
        return lims, scores, ids

    def keyword_search(
        self, text: str, k: int, *, filters: SearchFilters | dict | None = None
    ) -> list[dict]:
        """Top-``k`` rows whose file name, relative path or caption contain the words of ``text``
        (:mod:`index.keyword`), best first, each with its keyword ``score``."""
        where, params = where_sql(SearchFilters.coerce(filters))
        with self.state.lock if self.state.writer else contextlib.nullcontext():
            hits = kw.search(self.state.store, text, self.state.view, int(k), where, params)
            rows = self.state.store.get([rid for rid, _ in hits], self.state.view)
        return [{**rows[rid], "score": score} for rid, score in hits if rid in rows]

    def _rerank(self, q: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for candidate ids from the stored vectors, re-sorted."""
        uniq = np.unique(cand[cand >= 0])
        locs = self.state.store.locations(uniq.tolist(), self.state.view)
        known = np.asarray([i for i in uniq.tolist() if i in locs], dtype=np.int64)
        if not len(known):
            return np.full(cand.shape, np.nan, dtype=np.float32), np.full_like(cand, -1)
        vecs = self.state.vectors.gather([locs[int(i)] for i in known], self.state.pending.as_map())
        pos = np.minimum(np.searchsorted(known, cand), len(known) - 1)
        ok = (cand >= 0) & (known[pos] == cand)
        gathered = vecs[pos]  # (Q, fetch, D)
        if self.state.metric == "ip":
            exact = np.einsum("qd,qkd->qk", q, gathered)
            exact = np.where(ok, exact, -np.inf)
            order = np.argsort(-exact, axis=1, kind="stable")
        else:
            exact = ((gathered - q[:, None, :]) ** 2).sum(-1)
            exact = np.where(ok, exact, np.inf)
            order = np.argsort(exact, axis=1, kind="stable")
        cand = np.where(ok, cand, -1)
        return np.take_along_axis(exact, order, 1).astype(np.float32), np.take_along_axis(cand, order, 1)
