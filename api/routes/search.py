"""``POST /search``: text, image (base64 JSON or multipart upload) or indexed image id -> top k."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from PIL import Image
from starlette.datastructures import UploadFile

from api.deps import AuthDep, ServiceDep
from api.limits import unless_disconnected
from api.routes import (
    UPLOAD_MARK,
    body_with_upload,
    content_type,
    error_responses,
    form_integer,
    is_form,
    require_json,
    validate_body,
)
from api.schemas import MAX_ID, SearchRequest, SearchResponse, SearchResult
from api.service import Service, decode_base64_image
from index import hybrid
from retrieval.images import ImageDecodeError, open_image

logger = logging.getLogger(__name__)
router = APIRouter(tags=["search"])

def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references replaced by the definitions (the OpenAPI body is inlined)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(schema)


_JSON_SCHEMA = _inline_defs(SearchRequest.model_json_schema())
_MULTIPART_FIELDS = {
    "image": {"type": "string", "format": "binary", "description": "image file"},
    "text": {"type": "string", "minLength": 1, "maxLength": 10_000},
    "image_id": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
}
_MULTIPART_K = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10}
# exactly one query field: one closed branch per field, so generators and validators agree
_MULTIPART_SCHEMA = {
    "oneOf": [
        {
            "type": "object",
            "properties": {name: field, "k": _MULTIPART_K},
            "required": [name],
            "additionalProperties": False,
        }
        for name, field in _MULTIPART_FIELDS.items()
    ]
}
_OPENAPI_BODY = body_with_upload(_JSON_SCHEMA, _MULTIPART_SCHEMA, "image", "image/*")


def _validate(data: dict[str, Any] | bytes) -> SearchRequest:
    return validate_body(SearchRequest, data)


def _form_image(value: str, field_name: str = "image") -> bytes:
    """An ``image`` (or video) form part sent without a filename: base64 text, or the file's bytes themselves.

    Starlette hands such a part over as text, decoded as UTF-8 or, failing that, as Latin-1; image files
    are never valid UTF-8 (PNG, JPEG, GIF, WebP headers), so Latin-1 gives their bytes back exactly."""
    try:
        return decode_base64_image(value, field_name)
    except HTTPException:
        try:
            raw = value.encode("latin-1")
            raw.decode("utf-8")
        except UnicodeEncodeError:
            raise
        except UnicodeDecodeError:
            return raw  # binary content: the part was the file itself
        raise


async def _parse(request: Request) -> tuple[SearchRequest, bytes | None]:
    """The request and the raw image bytes (None for text / image_id queries)."""
    media = content_type(request)
    if is_form(media):
        try:
            form = await request.form(max_files=1, max_fields=8)
        except ValueError as exc:  # python-multipart's parse errors (older Starlette lets them through)
            raise HTTPException(400, f"malformed multipart body: {exc}") from exc
        fields: dict[str, Any] = {}
        raw: bytes | None = None
        for key, value in form.multi_items():
            if key in fields:
                raise HTTPException(422, f"form field '{key}' given more than once")
            if isinstance(value, UploadFile):
                if key != "image":
                    raise HTTPException(422, f"unexpected file field '{key}' (only 'image' is a file)")
                raw = await value.read()
                fields[key] = UPLOAD_MARK
            elif key in ("k", "image_id"):
                fields[key] = form_integer(value)
            else:
                fields[key] = value
        req = _validate(fields)
        if req.image is not None and raw is None:
            raw = _form_image(req.image)
        return req, raw
    require_json(media)
    req = _validate(await request.body())
    return req, decode_base64_image(req.image) if req.image is not None else None


async def query_vector(service: Service, req: SearchRequest, raw: bytes | None, index: Any) -> np.ndarray:
    """The ``(D,)`` query embedding for whichever query field was given."""
    if req.text is not None:
        return await service.embed_text(req.text)
    if raw is not None:
        return await service.embed_image_bytes(raw)
    assert req.image_id is not None
    await service.indexed_row(index, req.image_id)
    return (await service.require_index().run(index.get_vectors, [req.image_id]))[0]


async def search_index(service: Service, index: Any, vector: np.ndarray, k: int) -> list[SearchResult]:
    """Top-``k`` rows of ``index`` for one query vector, best first."""
    holder = service.require_index()
    k = min(k, len(index))
    if k == 0:
        return []
    query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    _, _, rows = await holder.run(index.search, query, k)
    return [
        _result(r)
        for r in rows[0]
        if r is not None and int(r["id"]) >= 0 and math.isfinite(float(r["score"]))
    ]


def _seconds(value: Any) -> float | None:
    return float(value) if value is not None else None


def _result(row: dict[str, Any]) -> SearchResult:
    """One index row as a search result: images have kind "image" and no times (rows of indexes built
    before videos carry no ``kind``)."""
    kind = row.get("kind") or "image"
    timed = kind != "image"
    return SearchResult(
        id=int(row["id"]),
        path=str(row["path"]),
        score=float(row["score"]),
        kind=kind,
        t_start=_seconds(row.get("t_start")) if timed else None,
        t_end=_seconds(row.get("t_end")) if timed else None,
        caption=row.get("caption") or None,
        found_by=row["found_by"] if "found_by" in row else ["vector"],
    )


def _run_search(index: Any, req: SearchRequest, vector: np.ndarray | None) -> list[dict[str, Any]]:
    return hybrid.search(
        index,
        k=req.k,
        mode=req.mode,
        vector=vector,
        text=req.text if req.mode != "vector" else None,
        filters=req.filters.model_dump(exclude_none=True) if req.filters is not None else None,
        offset=req.offset,
        alpha=req.alpha,
        rrf_k=req.rrf_k,
        min_score=req.min_score,
        deduplicate=req.deduplicate,
    )


async def retrieve_images(
    service: Service, index: Any, text: str, k: int
) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """Grounding for /chat and /v1's ``retrieval``: the top-``k`` indexed images for ``text`` (encoded
    through the micro-batcher, searched on the index thread, opened in a worker thread; unreadable files
    are skipped with a warning) and their ``{"id", "path", "score"}``."""
    if not text.strip() or len(index) == 0:
        if len(index) == 0:
            logger.warning("index is empty: answering without images")
        return [], []
    rows = await search_index(service, index, await service.embed_text(text), k)
    images: list[Image.Image] = []
    sources: list[dict[str, Any]] = []
    for row in rows:
        if row.kind != "image":  # a video or a segment: /chat grounds on images only
            logger.debug("skipping retrieved %s id=%s: not an image", row.kind, row.id)
            continue
        try:
            images.append(await asyncio.to_thread(open_image, row.path))
        except ImageDecodeError as exc:
            logger.warning("skipping retrieved image id=%s path=%s: %s", row.id, row.path, exc)
            continue
        sources.append(row.model_dump(include={"id", "path", "score"}))
    image_rows = sum(row.kind == "image" for row in rows)
    if len(images) < image_rows:
        skipped = image_rows - len(images)
        logger.warning("%d of %d retrieved images were unreadable and skipped", skipped, image_rows)
    return images, sources


@router.post(
    "/search",
    response_model=SearchResponse,
    dependencies=[AuthDep],
    openapi_extra=_OPENAPI_BODY,
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503),
)
async def search(request: Request, service: ServiceDep) -> SearchResponse:
    """Exactly one of ``text``, ``image`` (base64, or a multipart file) or ``image_id``; results
    ``offset .. offset + k`` of the ``mode`` ranking among the rows passing ``filters``."""
    start = time.perf_counter()
    req, raw = await _parse(request)
    holder = service.require_index()
    index = holder.current  # this request keeps this index object even across a reload
    with service.encode_gate.slot():
        vector = None
        if req.mode != "keyword":
            vector = await unless_disconnected(request, query_vector(service, req, raw, index))
        rows = await holder.run(_run_search, index, req, vector)
    results = [_result(r) for r in rows if int(r["id"]) >= 0 and math.isfinite(float(r["score"]))]
    return SearchResponse(results=results, took_ms=round((time.perf_counter() - start) * 1000.0, 3))
