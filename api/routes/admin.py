"""``POST /admin/reload``: swap in the index that ``build_index.py`` has just updated."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException

from api.deps import AuthDep, ServiceDep
from api.routes import error_responses
from api.schemas import ReloadResponse

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"])


@router.post(
    "/reload", response_model=ReloadResponse, dependencies=[AuthDep], responses=error_responses(401, 503)
)
async def reload_index(service: ServiceDep) -> ReloadResponse:
    """Re-open the index directory; in-flight searches finish on the old index."""
    holder = service.require_index()
    try:
        reloaded = await holder.reload(force=True)
    except Exception as exc:  # broken or half-written index on disk: keep serving the old one
        service.metrics.index_reloads.labels(result="error").inc()
        logger.warning("reload of %s failed: %s", holder.dir, exc)
        raise HTTPException(503, f"index reload failed, still serving the previous index: {exc}") from exc
    service.metrics.index_reloads.labels(result="ok").inc()
    return ReloadResponse(reloaded=reloaded, index_size=len(holder.current), index_dir=str(holder.dir))
