"""``GET /thumbs/{image_id}?size=N``: a JPEG thumbnail of an indexed file, with the access rules of
``/images/{id}``, cached on disk next to the index and revalidated by ETag."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from api.deps import AuthDep, ServiceDep
from api.routes import error_responses
from api.routes.images import resolve_indexed_file
from api.schemas import MAX_ID
from api.service import Service
from api.web.thumbnails import MAX_SIZE, MIN_SIZE, SIZE_BUCKETS, ThumbCache, ThumbKey, key_for, render
from chat.video import VideoDecodeError
from retrieval.images import ImageDecodeError

logger = logging.getLogger(__name__)
router = APIRouter(tags=["images"])

#: browsers may reuse a thumbnail for this long without asking; after that, a 304 by ETag
CACHE_CONTROL = "private, max-age=3600"
MEDIA_TYPE = "image/jpeg"


@functools.lru_cache(maxsize=16)
def _cache_in(folder: Path) -> ThumbCache:
    return ThumbCache(folder)


def _cache(service: Service) -> ThumbCache:
    """The thumbnail cache of the served index: its ``thumbs/`` folder."""
    return _cache_in(service.require_index().dir.absolute() / "thumbs")


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _thumbnail(cache: ThumbCache, key: ThumbKey, path: Path, max_pixels: int) -> bytes:
    """Worker thread: the cached thumbnail, or render and cache it."""
    data = cache.get(key)
    if data is None:
        data = render(path, key.size, key.poster_s, max_pixels)
        cache.put(key, data)
    return data


@router.get(
    "/thumbs/{image_id}",
    dependencies=[AuthDep],
    response_class=Response,
    responses={
        200: {
            "description": "JPEG thumbnail (longest side at most the size bucket; a video's poster frame, "
            "at the segment's start for segment rows)",
            "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        304: {"description": "not modified (If-None-Match matched the ETag)"},
        **error_responses(401, 404, 422, 503),
    },
)
async def get_thumbnail(
    image_id: Annotated[int, PathParam(ge=0, le=MAX_ID)],
    request: Request,
    service: ServiceDep,
    size: Annotated[
        int,
        Query(
            ge=MIN_SIZE,
            le=MAX_SIZE,
            description=f"longest side in pixels, rounded up to one of {list(SIZE_BUCKETS)}",
        ),
    ] = 256,
) -> Response:
    """A thumbnail of the indexed image, or a poster frame of the video (segment rows: at ``t_start``)."""
    holder = service.require_index()
    row = await service.indexed_row(holder.current, image_id)
    path = resolve_indexed_file(row, service.settings.image_roots)
    video = (row.get("kind") or "image") != "image"
    poster_s = float(row.get("t_start") or 0.0) if video else None
    try:
        key = key_for(image_id, path, size, poster_s)
    except OSError as exc:
        raise HTTPException(404, f"file of image {image_id} cannot be read") from exc
    headers = {"ETag": key.etag, "Cache-Control": CACHE_CONTROL}
    if _matches(request.headers.get("if-none-match"), key.etag):
        return Response(status_code=304, headers=headers)
    try:
        data = await run_in_threadpool(_thumbnail, _cache(service), key, path, service.settings.max_pixels)
    except (ImageDecodeError, VideoDecodeError) as exc:
        what = "video" if video else "image"
        logger.info("no thumbnail for %s %s (%s): %s", what, image_id, exc.reason, exc)
        detail = {"reason": exc.reason, "message": f"cannot decode the {what}: {exc}"}
        raise HTTPException(422, detail) from exc
    except OSError as exc:  # the file vanished or became unreadable between the checks and the decode
        raise HTTPException(404, f"file of image {image_id} cannot be read: {exc}") from exc
    return Response(data, media_type=MEDIA_TYPE, headers=headers)
