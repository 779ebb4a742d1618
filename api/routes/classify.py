"""``POST /classify``: zero-shot classification of one image over free-text labels."""

from __future__ import annotations

import logging

import numpy as np
from fastapi import APIRouter, Request

from api.deps import AuthDep, ServiceDep
from api.limits import unless_disconnected
from api.routes import error_responses
from api.schemas import ClassifyRequest, ClassifyResponse, LabelScore
from api.service import Service, decode_base64_image
from retrieval.zero_shot import label_prompts, pool_class_embeddings, probabilities

logger = logging.getLogger(__name__)
router = APIRouter(tags=["classify"])


async def _image_embedding(service: Service, req: ClassifyRequest) -> np.ndarray:
    """``(1, D)``: the uploaded image encoded (micro-batched), or the indexed image's stored vector."""
    if req.image is not None:
        return (await service.embed_image_bytes(decode_base64_image(req.image)))[None, :]
    assert req.image_id is not None
    holder = service.require_index()
    index = holder.current
    await service.indexed_row(index, req.image_id)
    return await holder.run(index.get_vectors, [req.image_id])


async def _probabilities(service: Service, req: ClassifyRequest) -> np.ndarray:
    """``zero_shot.classify``'s probabilities ``(1, L)``, with the labels x templates prompts encoded through
    the text micro-batcher in chunks (not one huge encoder call)."""
    encoder = service.require_encoder()
    embedding = await _image_embedding(service, req)
    prompts = label_prompts(list(req.labels), req.templates)
    classes = pool_class_embeddings(await service.embed_texts(prompts), len(req.labels))
    return probabilities(encoder.logit_scale, embedding, classes)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    dependencies=[AuthDep],
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
)
async def classify(req: ClassifyRequest, request: Request, service: ServiceDep) -> ClassifyResponse:
    """Probabilities over ``labels`` (sorted, summing to 1), optionally with prompt ``templates``."""
    service.require_encoder()
    with service.encode_gate.slot():
        probs = await unless_disconnected(request, _probabilities(service, req))
    row = np.asarray(probs, dtype=np.float64).reshape(-1)
    order = np.argsort(-row, kind="stable")
    scores = [LabelScore(label=req.labels[i], score=float(row[i])) for i in order]
    return ClassifyResponse(label=scores[0].label, scores=scores)
