"""``GET /images/{image_id}``: the indexed file (an image, or the video of a video / segment row), and only
files inside the indexed roots."""

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
from chat.video import VIDEO_EXTENSIONS
from retrieval.images import supported_extensions

logger = logging.getLogger(__name__)
router = APIRouter(tags=["images"])

#: content types of the indexed video containers (``mimetypes`` knows only some of them, per platform)
VIDEO_MEDIA_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
}


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
    video = (row.get("kind") or "image") != "image"
    allowed = VIDEO_EXTENSIONS if video else supported_extensions()
    if real.suffix.lower() not in allowed or not real.is_file():
        what = "a video" if video else "an image"
        raise HTTPException(404, f"file of image {row.get('id')} is missing or not {what}")
    return real


def media_type_of(path: Path) -> str:
    """The file's content type: ``video/*`` for the video containers, else by its name."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_MEDIA_TYPES:
        return VIDEO_MEDIA_TYPES[suffix]
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


@router.get(
    "/images/{image_id}",
    dependencies=[AuthDep],
    response_class=FileResponse,
    responses={
        200: {
            "description": "the image file; for a video or segment row, the whole video file (HTTP range "
            "requests are honoured where the server's Starlette supports them)",
            "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "video/*": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **error_responses(401, 404, 422, 503),
    },
)
async def get_image(
    image_id: Annotated[int, PathParam(ge=0, le=MAX_ID)], service: ServiceDep
) -> FileResponse:
    """Serve the file recorded in the index for ``image_id``: the image, or for a video or segment row the
    video file (``video/*``; a segment's ``t_start`` / ``t_end`` come with its search result)."""
    holder = service.require_index()
    row = await service.indexed_row(holder.current, image_id)
    real = resolve_indexed_file(row, service.settings.image_roots)
    return FileResponse(real, media_type=media_type_of(real))
