"""``GET /images/{image_id}``: the indexed file, and only files inside the indexed roots."""

from __future__ import annotations

import logging
import mimetypes
import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from api.deps import AuthDep, ServiceDep
from api.routes import error_responses
from api.schemas import MAX_ID
from retrieval.images import supported_extensions

logger = logging.getLogger(__name__)
router = APIRouter(tags=["images"])


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_indexed_file(row: dict, extra_roots: list[str]) -> Path:
    """The real path of an index row's file, or an HTTP error when it is gone or outside its root."""
    recorded = row.get("path")
    if not recorded:
        raise HTTPException(404, f"image {row.get('id')} has no file path")
    real = Path(os.path.realpath(recorded))  # follows symlinks: a link out of the root is caught below
    roots = [Path(os.path.realpath(r)) for r in [row.get("root"), *extra_roots] if r]
    if roots and not _inside(real, roots):
        logger.warning("refusing to serve %s: outside the indexed roots %s", real, roots)
        raise HTTPException(404, f"image {row.get('id')} is outside the indexed roots")
    if real.suffix.lower() not in supported_extensions() or not real.is_file():
        raise HTTPException(404, f"file of image {row.get('id')} is missing or not an image")
    return real


@router.get(
    "/images/{image_id}",
    dependencies=[AuthDep],
    response_class=FileResponse,
    responses={
        200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(401, 404, 422, 503),
    },
)
async def get_image(
    image_id: Annotated[int, PathParam(ge=0, le=MAX_ID)], service: ServiceDep
) -> FileResponse:
    """Serve the file recorded in the index for ``image_id``."""
    holder = service.require_index()
    row = await service.indexed_row(holder.current, image_id)
    real = resolve_indexed_file(row, service.settings.image_roots)
    media_type = mimetypes.guess_type(real.name)[0] or "application/octet-stream"
    return FileResponse(real, media_type=media_type)
