"""``POST /classify``: zero-shot classification of one image or video over free-text labels."""

from __future__ import annotations

import logging

import numpy as np
from fastapi import APIRouter, Request

from api.deps import AuthDep, ServiceDep
from api.limits import unless_disconnected
from api.routes import error_responses
from api.routes.chat import check_video_limits, video_bytes, video_error
from api.schemas import ClassifyRequest, ClassifyResponse, LabelScore
from api.service import Service, decode_base64_image
from chat.video import VideoDecodeError
from retrieval.video import embed_video
from retrieval.zero_shot import label_prompts, pool_class_embeddings, probabilities

logger = logging.getLogger(__name__)
router = APIRouter(tags=["classify"])


def _video_vector(service: Service, raw: bytes) -> np.ndarray:
    """Encoder thread: the limits checked (demuxing only), then the frame-averaged embedding ``(D,)`` of
    ``embed_video`` (the InternVL paper's zero-shot video protocol), as the index stores for a video row."""
    check_video_limits(service, raw)
    s = service.settings
    encoder = service.require_encoder()
    return embed_video(encoder, raw, max_duration=s.max_video_duration_s, max_pixels=s.max_pixels).vector


async def _video_embedding(service: Service, data: str) -> np.ndarray:
    raw = video_bytes(service, data, "video")
    try:
        vector = await service.run_encoder(_video_vector, service, raw)
    except VideoDecodeError as exc:
        raise video_error(exc, "video") from exc
    return np.asarray(vector, dtype=np.float32)[None, :]


async def _image_embedding(service: Service, req: ClassifyRequest) -> np.ndarray:
    """``(1, D)``: the uploaded image encoded (micro-batched), the uploaded video's frame-averaged
    embedding, or the indexed row's stored vector (for a video or segment row, its frame-averaged one)."""
    if req.image is not None:
        return (await service.embed_image_bytes(decode_base64_image(req.image)))[None, :]
    if req.video is not None:
        return await _video_embedding(service, req.video)
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
    """Probabilities over ``labels`` (sorted, summing to 1), optionally with prompt ``templates``.

    Exactly one of ``image`` (base64), ``video`` (base64; the size, duration and frame limits of /chat
    apply) or ``image_id`` (an indexed image, video or segment)."""
    service.require_encoder()
    with service.encode_gate.slot():
        probs = await unless_disconnected(request, _probabilities(service, req))
    row = np.asarray(probs, dtype=np.float64).reshape(-1)
    order = np.argsort(-row, kind="stable")
    scores = [LabelScore(label=req.labels[i], score=float(row[i])) for i in order]
    return ClassifyResponse(label=scores[0].label, scores=scores)
