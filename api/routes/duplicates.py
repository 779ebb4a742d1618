"""``GET /duplicates``: groups of near-duplicate indexed rows, best copy first (:mod:`index.duplicates`)."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import AuthDep, ServiceDep
from api.routes import error_responses
from api.routes.search import _result
from api.schemas import DuplicateGroup, DuplicatesResponse
from index.duplicates import DEFAULT_THRESHOLD, find_duplicates

logger = logging.getLogger(__name__)
router = APIRouter(tags=["duplicates"])

#: groups per index object (a reload swaps in a new object) and threshold, for paging without recomputing
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, float], list[list[dict]]]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()
_PER_INDEX = 4


def _groups(index: Any, threshold: float) -> list[list[dict]]:
    key = (index.view_generation, threshold)
    with _CACHE_LOCK:
        cached = _CACHE.get(index, {}).get(key)
    if cached is not None:
        return cached
    groups = find_duplicates(index, threshold)
    with _CACHE_LOCK:
        entries = _CACHE.setdefault(index, {})
        if len(entries) >= _PER_INDEX:
            entries.pop(next(iter(entries)))
        entries[key] = groups
    return groups


@router.get(
    "/duplicates",
    response_model=DuplicatesResponse,
    dependencies=[AuthDep],
    responses=error_responses(401, 422, 503),
)
async def duplicates(
    service: ServiceDep,
    threshold: Annotated[
        float, Query(ge=0.5, le=1.0, description="cosine similarity at or above which rows are duplicates")
    ] = DEFAULT_THRESHOLD,
    limit: Annotated[int, Query(ge=1, le=1000, description="groups per page")] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="groups to skip")] = 0,
) -> DuplicatesResponse:
    """Near-duplicate groups (largest first), each best copy first (largest width x height, then file size);
    ``score`` of a row is its similarity to the group's best copy."""
    holder = service.require_index()
    index = holder.current
    groups = await holder.run(_groups, index, float(threshold))
    page = groups[offset : offset + limit]
    vectors = await holder.run(_best_similarity, index, page)
    out = [
        DuplicateGroup(results=[_result({**row, "score": x, "found_by": []}) for row, x in pairs])
        for pairs in (zip(g, s, strict=True) for g, s in zip(page, vectors, strict=True))
    ]
    return DuplicatesResponse(threshold=float(threshold), total_groups=len(groups), groups=out)


def _best_similarity(index: Any, groups: list[list[dict]]) -> list[list[float]]:
    out = []
    for group in groups:
        vecs = index.get_vectors([r["id"] for r in group])
        out.append([float(x) for x in vecs @ vecs[0]])
    return out
