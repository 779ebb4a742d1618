"""Near-duplicate groups: FAISS range search over the stored vectors + connected components.

Two rows are near-duplicates when their stored (float16) embeddings have inner product ``>= threshold``
(metric ``ip``, unit vectors: cosine similarity) or squared L2 distance ``<= threshold`` (metric ``l2``).
Groups are the connected components of that relation (as clip-retrieval and immich do), members ordered
best copy first: largest ``width * height``, then larger file, then smaller id. Candidate pairs come from
the index's own FAISS ``range_search`` (exact for flat indexes) and are confirmed on the stored vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: cosine similarity at or above which two embeddings are the same picture. Measured with the demo model on
#: 55 ``generate_shapes.py`` images (seed 7) of distinct shape x colour, each with a half-size, a JPEG q60
#: and a 5 %-cropped copy: at 0.92 pair precision 0.97 / recall 0.98 (0.90: 0.94 / 0.98; 0.95: 0.98 / 0.91;
#: crops are the hardest copies, distinct images of one shape and colour the closest non-copies)
DEFAULT_THRESHOLD = 0.92
#: query vectors per ``range_search`` call
BATCH = 4096


def best_first_key(row: dict) -> tuple:
    """Sort key: largest resolution, then larger file, then smaller id."""
    area = int(row.get("width") or 0) * int(row.get("height") or 0)
    return (-area, -int(row.get("size") or 0), int(row["id"]))


def _close(metric: str, scores: np.ndarray, threshold: float) -> np.ndarray:
    return scores >= threshold if metric == "ip" else scores <= threshold


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (smallest member position) of each of ``n`` nodes given edges a-b."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.asarray([find(x) for x in range(n)])


def duplicate_pairs(index: Any, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All visible ids and the near-duplicate pairs as positions into them (``a < b``)."""
    ids = index.ids()
    if len(ids) < 2:
        return ids, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # float16 rounding of stored vectors can move a score by ~1e-3: query FAISS a bit wider, then confirm
    margin = 2e-3 if index.metric == "ip" else 4e-3
    radius = threshold - margin if index.metric == "ip" else threshold + margin
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for start in range(0, len(ids), BATCH):
        batch_ids = ids[start : start + BATCH]
        vecs = index.get_vectors(batch_ids)
        lims, _, found = index.range_candidates(vecs, radius)
        counts = np.diff(lims.astype(np.int64))
        src.append(np.repeat(np.arange(start, start + len(batch_ids)), counts))
        dst.append(found.astype(np.int64))
    a, b_ids = np.concatenate(src), np.concatenate(dst)
    pos = np.searchsorted(ids, b_ids)
    pos = np.minimum(pos, len(ids) - 1)
    keep = (ids[pos] == b_ids) & (pos != a)  # drop removed (HNSW dead) ids and self matches
    a, b = a[keep], pos[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = np.unique(np.stack([lo, hi], 1), axis=0) if len(lo) else np.zeros((0, 2), dtype=np.int64)
    if len(pairs):
        exact = _pair_scores(index, ids, pairs)
        pairs = pairs[_close(index.metric, exact, threshold)]
    return ids, pairs[:, 0], pairs[:, 1]


def _pair_scores(index: Any, ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    out = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), 65536):
        p = pairs[start : start + 65536]
        va, vb = index.get_vectors(ids[p[:, 0]]), index.get_vectors(ids[p[:, 1]])
        out[start : start + len(p)] = (va * vb).sum(1) if index.metric == "ip" else ((va - vb) ** 2).sum(1)
    return out


def find_duplicates(index: Any, threshold: float = DEFAULT_THRESHOLD) -> list[list[dict]]:
    """Groups (two or more rows) of near-duplicates, each best copy first; largest groups first, then by
    their best copy's id. Rows are the index's row dicts."""
    ids, a, b = duplicate_pairs(index, threshold)
    if not len(a):
        return []
    labels = _components(len(ids), a, b)
    members = np.unique(np.concatenate([a, b]))
    groups: dict[int, list[int]] = {}
    for p in members.tolist():
        groups.setdefault(int(labels[p]), []).append(int(ids[p]))
    rows = {r["id"]: r for r in index.get([i for g in groups.values() for i in g]) if r is not None}
    out = [sorted((rows[i] for i in g if i in rows), key=best_first_key) for g in groups.values()]
    out = [g for g in out if len(g) > 1]
    out.sort(key=lambda g: (-len(g), g[0]["id"]))
    logger.info("%d near-duplicate groups (%d rows) at threshold %g", len(out), sum(map(len, out)), threshold)
    return out


def collapse(index: Any, rows: Sequence[dict], threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """``rows`` (ranked) with each group of near-duplicates among them replaced by its best copy, at the
    position of the group's first-ranked member (the best copy keeps that member's ranking fields)."""
    if len(rows) < 2:
        return list(rows)
    ids = np.asarray([int(r["id"]) for r in rows], dtype=np.int64)
    vecs = index.get_vectors(ids)
    if index.metric == "ip":
        sims = vecs @ vecs.T
    else:
        sq = (vecs * vecs).sum(1)
        sims = sq[:, None] + sq[None, :] - 2.0 * (vecs @ vecs.T)
    a, b = np.nonzero(np.triu(_close(index.metric, sims, threshold), 1))
    labels = _components(len(rows), a, b)
    out: list[dict] = []
    for pos, row in enumerate(rows):
        label = int(labels[pos])
        if label != pos:  # a later member of an earlier group
            continue
        group = [rows[j] for j in np.nonzero(labels == label)[0].tolist()]
        best = min(group, key=best_first_key)
        out.append(row if best is row else {**best, **{k: v for k, v in row.items() if k in _RANKING}})
    return out


#: per-result fields that describe the ranking, not the row (kept from the group's first-ranked member)
_RANKING = ("score", "found_by")
