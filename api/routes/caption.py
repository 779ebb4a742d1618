"""``POST /caption``: an InternVL-G caption of one image (base64 JSON, multipart upload, or an indexed id)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from fastapi import APIRouter, HTTPException, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.deps import AuthDep, ServiceDep
from api.limits import unless_disconnected
from api.routes import (
    body_with_upload,
    content_type,
    error_responses,
    is_form,
    read_form,
    require_json,
    validate_body,
)
from api.routes.chat import video_error
from api.routes.images import resolve_indexed_file
from api.routes.search import _form_image
from api.schemas import CaptionRequest, CaptionResponse
from api.service import Service, decode_base64_image
from chat.video import VideoDecodeError, sample_frames
from retrieval.base import Encoder
from retrieval.errors import CaptioningNotSupportedError
from retrieval.images import open_image

logger = logging.getLogger(__name__)
router = APIRouter(tags=["caption"])

# ---------------------------------------------------------------------------------------------- body
_JSON_SCHEMA = CaptionRequest.model_json_schema()
_KNOBS = ("prompt", "num_beams", "min_new_tokens", "max_new_tokens", "do_sample", "temperature", "top_p",
          "top_k", "seed")  # fmt: skip


def _multipart_schema() -> dict[str, Any]:
    """multipart/form-data: an ``image`` file and the knobs of CaptionRequest (same bounds)."""
    props = _JSON_SCHEMA["properties"]
    fields: dict[str, Any] = {}
    for name in _KNOBS:
        field = props[name]
        branches = [b for b in field.get("anyOf", [field]) if b.get("type") != "null"]
        fields[name] = {**branches[0], **{k: v for k, v in field.items() if k in ("default", "description")}}
    fields["image"] = {"type": "string", "format": "binary", "description": "image file"}
    return {"type": "object", "properties": fields, "required": ["image"], "additionalProperties": False}


_MULTIPART_SCHEMA = _multipart_schema()
_OPENAPI_BODY = body_with_upload(_JSON_SCHEMA, _MULTIPART_SCHEMA, "image", "image/*")


async def _parse(request: Request) -> tuple[CaptionRequest, bytes | None]:
    """The request and the image bytes (None for an ``image_id``)."""
    media = content_type(request)
    if is_form(media):
        fields, raw = await read_form(request, _MULTIPART_SCHEMA, "image", "/caption")
        if "image" not in fields:
            raise HTTPException(422, "a multipart /caption request needs an 'image' file")
        req = validate_body(CaptionRequest, fields)
        if raw is None:
            assert req.image is not None
            raw = _form_image(req.image)
        return req, raw
    require_json(media)
    req = validate_body(CaptionRequest, await request.body())
    return req, decode_base64_image(req.image) if req.image is not None else None


# ---------------------------------------------------------------------------------------------- image
def _middle_frame(path: str, row: dict[str, Any], max_pixels: int | None) -> Image.Image:
    """The middle frame of a video row (whole video) or segment row (``[t_start, t_end)``)."""
    bound = None
    if (row.get("kind") or "image") == "segment" and row.get("t_end") is not None:
        bound = (float(row.get("t_start") or 0.0), float(row["t_end"]))
    try:
        _, frames, _ = sample_frames(path, bound, num_segments=1, max_pixels=max_pixels)
    except ValueError as exc:
        if isinstance(exc, VideoDecodeError):
            raise
        raise HTTPException(422, f"image {row.get('id')}: {exc}") from exc
    return Image.fromarray(frames[0]).convert("RGB")


async def _indexed_image(service: Service, image_id: int) -> Image.Image:
    """The indexed file of ``image_id`` (404 if unknown or gone), decoded in a worker thread."""
    holder = service.require_index()
    row = await service.indexed_row(holder.current, image_id)
    path = str(resolve_indexed_file(row, service.settings.image_roots))
    max_pixels = service.settings.max_pixels
    if (row.get("kind") or "image") == "image":
        return await run_in_threadpool(open_image, path, max_pixels=max_pixels)
    try:
        return await run_in_threadpool(_middle_frame, path, row, max_pixels)
    except VideoDecodeError as exc:
        raise video_error(exc, "image_id") from exc


# ---------------------------------------------------------------------------------------------- model
_SEED_LOCK = threading.Lock()


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """With a seed: the global RNGs (CPU and the model's GPU) seeded, and restored afterwards; one seeded
    call at a time. Without: nothing (the process' RNG)."""
    if seed is None:
        yield
        return
    cuda = [device.index or 0] if device.type == "cuda" else []
    with _SEED_LOCK, torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def generation_kwargs(req: CaptionRequest) -> dict[str, Any]:
    """``encoder.caption`` keyword arguments of a request (the sampling knobs only when sampling)."""
    kwargs: dict[str, Any] = dict(
        num_beams=req.num_beams,
        min_new_tokens=min(req.min_new_tokens, req.max_new_tokens),
        max_new_tokens=req.max_new_tokens,
        do_sample=req.do_sample,
    )
    if req.do_sample:
        kwargs.update(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
        kwargs["remove_invalid_values"] = True  # never a NaN error from a degenerate distribution
    return kwargs


def _caption(encoder: Encoder, image: Image.Image, req: CaptionRequest) -> str:
    """Encoder thread: one caption."""
    with _seeded(req.seed if req.do_sample else None, encoder.device):
        return encoder.caption([image], req.prompt, **generation_kwargs(req))[0]


@router.post(
    "/caption",
    response_model=CaptionResponse,
    dependencies=[AuthDep],
    openapi_extra=_OPENAPI_BODY,
    description="A multipart/form-data body takes the image as an `image` file part.",
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503),
)
async def caption(request: Request, service: ServiceDep) -> CaptionResponse:
    """Caption one image (``image`` base64 or multipart file, or ``image_id``) with ``prompt``: beam search
    by default (``num_beams``), greedy with ``num_beams=1``, sampling with ``do_sample`` (``temperature``,
    ``top_p``, ``top_k``, ``seed``). 400 when the loaded encoder cannot caption (e.g. OpenCLIP)."""
    start = time.perf_counter()
    req, raw = await _parse(request)
    encoder = service.require_encoder()
    with service.encode_gate.slot():
        if raw is not None:
            image = await service.decode_image(raw)
        else:
            assert req.image_id is not None
            image = await _indexed_image(service, req.image_id)
        try:
            text = await unless_disconnected(request, service.run_encoder(_caption, encoder, image, req))
        except CaptioningNotSupportedError as exc:
            raise HTTPException(400, str(exc)) from exc
    return CaptionResponse(
        caption=text,
        prompt=req.prompt,
        image_id=req.image_id,
        took_ms=round((time.perf_counter() - start) * 1000.0, 3),
    )
