"""JSON error responses: every error is ``{"detail": ...}`` with the right status, never an HTML page."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.images import ImageDecodeError

logger = logging.getLogger(__name__)


def _clean_errors(errors: list) -> list[dict]:
    """Validation errors without echoed inputs (could be megabytes of base64) or unserialisable context."""
    out = []
    for err in errors:
        if isinstance(err, dict):
            out.append(
                {"type": err.get("type"), "loc": list(err.get("loc", ())), "msg": str(err.get("msg", ""))}
            )
        else:
            out.append({"type": "value_error", "loc": [], "msg": str(err)})
    return out


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _clean_errors(list(exc.errors()))}, status_code=422)


async def image_error(request: Request, exc: ImageDecodeError) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "reason": exc.reason}, status_code=422)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the JSON handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ImageDecodeError, image_error)
    app.add_exception_handler(Exception, unexpected_error)
