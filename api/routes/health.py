"""``GET /health`` and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServiceDep
from api.schemas import HealthResponse, ModelsInfo

router = APIRouter(tags=["health"])


def _chat_name(model: object, path: str | None) -> str | None:
    if model is None:
        return None
    return getattr(model, "name", None) or path or repr(model)


@router.get("/health", response_model=HealthResponse)
async def health(service: ServiceDep) -> HealthResponse:
    """Readiness: loaded models, device, index size."""
    enc = service.encoder
    holder = service.index
    index = holder.current if holder is not None else None
    return HealthResponse(
        ready=service.ready,
        models=ModelsInfo(
            encoder=getattr(enc, "name", None),
            encoder_mode=getattr(enc, "mode", None),
            embed_dim=getattr(enc, "embed_dim", None),
            chat=_chat_name(service.chat_model, service.settings.chat_model),
        ),
        device=str(enc.device) if enc is not None else None,
        dtype=str(enc.dtype).removeprefix("torch.") if getattr(enc, "dtype", None) is not None else None,
        index_size=len(index) if index is not None else 0,
        index_dir=str(holder.dir) if holder is not None else None,
        batching=service.settings.batching,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    holder = service.index
    if holder is not None and holder.current is not None:
        service.metrics.index_size.set(len(holder.current))
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
