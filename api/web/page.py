"""``GET /`` and ``GET /static/{name}``: the web page, public (its data calls carry the API key), with a
Content-Security-Policy that allows only same-origin scripts, styles, requests and media."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from api.web import STATIC_DIR

logger = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob:",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: the files the page is made of (nothing else under the package folder is served)
STATIC_FILES = frozenset(
    p.name for p in (STATIC_DIR.iterdir() if STATIC_DIR.is_dir() else ()) if p.suffix in _MEDIA_TYPES
)


def _file(name: str, cache: str) -> FileResponse:
    path = STATIC_DIR / name
    headers = {**SECURITY_HEADERS, "Cache-Control": cache}
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=headers)


@router.get("/", response_class=FileResponse)
async def index_page() -> FileResponse:
    """The page: search, browse, classify and ask."""
    if "index.html" not in STATIC_FILES:
        logger.error("the web page's files are missing from %s (package data not installed?)", STATIC_DIR)
        raise HTTPException(404, "the web page is not installed")
    return _file("index.html", "no-cache")


@router.get("/static/{name}", response_class=FileResponse)
async def static_file(name: Annotated[str, PathParam(max_length=100)]) -> FileResponse:
    """One of the page's scripts, styles or icons (revalidated by ETag, so an upgrade is seen at once)."""
    if name not in STATIC_FILES:
        raise HTTPException(404, f"no static file {name!r}")
    return _file(name, "no-cache")
