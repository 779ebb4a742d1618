"""Search modes over one index: ``vector``, ``keyword`` and ``hybrid`` (reciprocal-rank fusion), with
filters, near-duplicate collapsing, ``min_score`` and ``offset`` pagination.

Hybrid scores are weighted reciprocal-rank fusion (Cormack et al. 2009, as Weaviate's ``rankedFusion`` and
Marqo): ``alpha / (rrf_k + rank_vector) + (1 - alpha) / (rrf_k + rank_keyword)`` with ranks from 1, a
ranking that did not find a row contributing 0. Each ranking contributes its top
``max(HYBRID_POOL, offset + k)`` rows, so pages stay consistent while ``offset + k <= HYBRID_POOL``.
Every result row carries ``found_by``: the rankings (``"vector"``, ``"keyword"``) that found it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from index.duplicates import DEFAULT_THRESHOLD, collapse
from index.filters import SearchFilters

MODES = ("vector", "keyword", "hybrid")
DEFAULT_ALPHA = 0.5
DEFAULT_RRF_K = 60
#: candidates each ranking contributes to a hybrid search (at least offset + k)
HYBRID_POOL = 100
#: with ``deduplicate`` this many times the needed rows are ranked, so collapsed groups leave enough
DEDUP_OVERFETCH = 3


def fuse(
    rankings: Mapping[str, Sequence[int]], weights: Mapping[str, float], rrf_k: int = DEFAULT_RRF_K
) -> list[tuple[int, float, list[str]]]:
    """Weighted reciprocal-rank fusion of id rankings (best first): ``(id, score, found_by)`` best first,
    ties broken by id."""
    scores: dict[int, float] = {}
    found: dict[int, list[str]] = {}
    for name, ids in rankings.items():
        weight = float(weights.get(name, 0.0))
        for rank, rid in enumerate(ids, start=1):
            scores[rid] = scores.get(rid, 0.0) + weight / (rrf_k + rank)
            found.setdefault(rid, []).append(name)
    order = sorted(scores, key=lambda rid: (-scores[rid], rid))
    return [(rid, scores[rid], found[rid]) for rid in order]


def search(
    index: Any,
    *,
    k: int,
    mode: str = "vector",
    vector: np.ndarray | None = None,
    text: str | None = None,
    filters: SearchFilters | Mapping[str, Any] | None = None,
    offset: int = 0,
    alpha: float = DEFAULT_ALPHA,
    rrf_k: int = DEFAULT_RRF_K,
    min_score: float | None = None,
    deduplicate: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[dict]:
    """Rows ``offset .. offset + k`` of the ranking ``mode`` asks for, each with ``score`` and ``found_by``.

    ``vector`` needs ``vector`` (the query embedding); ``keyword`` ranks by ``text`` (nothing without
    words); ``hybrid`` fuses both (the keyword ranking is empty without ``text``). ``min_score`` drops
    rows scoring below it (vector mode on an ``l2`` index: rows farther than it, the score being a squared
    distance). ``deduplicate`` collapses near-duplicates (:func:`index.duplicates.collapse` at
    ``threshold``) before paging.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if k < 1 or offset < 0 or rrf_k < 0:
        raise ValueError("k must be >= 1, offset and rrf_k >= 0")
    filters = SearchFilters.coerce(filters)
    need = offset + k
    fetch = need * DEDUP_OVERFETCH if deduplicate else need
    if mode == "vector":
        rows = _vector(index, vector, fetch, filters)
        for row in rows:
            row["found_by"] = ["vector"]
        distance = index.metric != "ip"
    elif mode == "keyword":
        found = index.keyword_search(text, fetch, filters=filters) if text and text.strip() else []
        rows = [{**r, "found_by": ["keyword"]} for r in found]
        distance = False
    else:
        pool = max(HYBRID_POOL, fetch)
        vec_rows = _vector(index, vector, pool, filters) if vector is not None else []
        kw_rows = index.keyword_search(text, pool, filters=filters) if text and text.strip() else []
        by_id = {r["id"]: r for r in kw_rows} | {r["id"]: r for r in vec_rows}
        fused = fuse(
            {"vector": [r["id"] for r in vec_rows], "keyword": [r["id"] for r in kw_rows]},
            {"vector": alpha, "keyword": 1.0 - alpha},
            rrf_k,
        )
        rows = [{**by_id[rid], "score": score, "found_by": found} for rid, score, found in fused]
        distance = False
    if min_score is not None:
        keep = (lambda s: s <= min_score) if distance else (lambda s: s >= min_score)
        rows = [r for r in rows if keep(float(r["score"]))]
    if deduplicate:
        rows = collapse(index, rows, threshold)
    return rows[offset:need]


def _vector(index: Any, vector: np.ndarray | None, k: int, filters: SearchFilters | None) -> list[dict]:
    if vector is None:
        raise ValueError("vector search needs a query vector")
    if len(index) == 0:
        return []
    _, _, rows = index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), k, filters=filters)
    return [r for r in rows[0] if r is not None and np.isfinite(float(r["score"]))]
