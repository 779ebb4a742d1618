"""``POST /classify``: zero-shot classification of one image over free-text labels."""

from __future__ import annotations

import logging

import numpy as np
from fastapi import APIRouter, HTTPException
from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.deps import AuthDep, ServiceDep
from api.routes import error_responses
from api.schemas import ClassifyRequest, ClassifyResponse, LabelScore
from api.service import Service, decode_base64_image
from retrieval.images import ImageDecodeError, open_image

logger = logging.getLogger(__name__)
router = APIRouter(tags=["classify"])


async def _request_image(service: Service, req: ClassifyRequest) -> Image.Image:
    if req.image is not None:
        return await service.decode_image(decode_base64_image(req.image))
    assert req.image_id is not None
    holder = service.require_index()
    row = await service.indexed_row(holder.current, req.image_id)
    try:
        return await run_in_threadpool(open_image, row["path"])
    except ImageDecodeError as exc:  # the indexed file moved or broke since indexing
        logger.warning("indexed image %s unreadable: %s", req.image_id, exc)
        raise HTTPException(404, f"indexed file of image_id {req.image_id} can no longer be read") from exc


def _check_templates(templates: list[str] | None) -> None:
    for template in templates or []:
        try:
            template.format("label")
        except (IndexError, KeyError, ValueError) as exc:
            raise HTTPException(
                422, f"template {template!r} must contain '{{}}' and no other braces"
            ) from exc


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    dependencies=[AuthDep],
    responses=error_responses(401, 404, 413, 422, 503),
)
async def classify(req: ClassifyRequest, service: ServiceDep) -> ClassifyResponse:
    """Probabilities over ``labels`` (sorted, summing to 1), optionally with prompt ``templates``."""
    encoder = service.require_encoder()
    _check_templates(req.templates)
    image = await _request_image(service, req)
    from retrieval.zero_shot import classify as zero_shot

    probs = await service.run_encoder(zero_shot, encoder, [image], list(req.labels), req.templates)
    row = np.asarray(probs, dtype=np.float64).reshape(-1)
    order = np.argsort(-row, kind="stable")
    scores = [LabelScore(label=req.labels[i], score=float(row[i])) for i in order]
    return ClassifyResponse(label=scores[0].label, scores=scores)
