"""``create_app(settings)``: the FastAPI application, with models loaded once in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from api.errors import install_error_handlers
from api.index_holder import IndexHolder
from api.metrics import Metrics, MetricsMiddleware
from api.middleware import BodyLimitMiddleware
from api.routes import admin, caption, chat, classify, duplicates, health, images, openai_compat, search
from api.service import Service
from api.settings import Settings
from api.web import page, thumbs
from retrieval.base import Encoder

logger = logging.getLogger(__name__)


def _open_index(path: Path) -> Any:
    from index import Index

    return Index.open(path)


def _check_index(index: Any, encoder: Encoder | None) -> None:
    """Refuse an index built with a different embedding width; warn on a different model name."""
    manifest = getattr(index, "manifest", None) or {}
    if encoder is None:
        return
    dim = manifest.get("embed_dim", manifest.get("dim"))
    if dim is not None and int(dim) != encoder.embed_dim:
        raise ValueError(
            f"index has dim {dim} but the encoder {encoder.name} makes {encoder.embed_dim}-d vectors"
        )
    model = manifest.get("model")
    if model is not None and model != encoder.name:
        logger.warning("index was built with model %r, serving with %r", model, encoder.name)


async def _load(service: Service, encoder: Encoder | None, chat_model: Any, opener: Callable) -> None:
    """Load models (worker threads), open the index, start the watcher and the batchers."""
    s = service.settings
    if encoder is None and s.model:
        from retrieval import load_encoder

        encoder = await run_in_threadpool(
            lambda: load_encoder(s.model, device=s.device, dtype=s.dtype)
        )
    service.encoder = encoder
    if chat_model is None and s.chat_model:
        from chat import load_chat_model

        chat_model = await run_in_threadpool(
            lambda: load_chat_model(
                s.chat_model, device=s.device, dtype=s.dtype, quantization=s.load_in, device_map=s.device_map
            )
        )
    service.chat_model = chat_model
    if chat_model is not None:
        service.setup_chat_executor()
    if s.index:
        holder = IndexHolder(s.index, opener)

        def accept(index: Any) -> None:  # runs before a (re)opened index is served
            _check_index(index, encoder)
            service.metrics.index_size.set(len(index))

        holder.on_swap = accept
        await holder.load()
        service.index = holder
        if s.reload_interval_s > 0:
            reloads = service.metrics.index_reloads
            watch = holder.watch(
                s.reload_interval_s,
                on_error=lambda exc: reloads.labels(result="error").inc(),
                on_reload=lambda: reloads.labels(result="ok").inc(),
            )
            service.background.append(asyncio.create_task(watch))
    if encoder is not None:
        service.setup_batchers()
        for batcher in (service.text_batcher, service.image_batcher):
            await batcher.start()


def create_app(
    settings: Settings | None = None,
    *,
    encoder: Encoder | None = None,
    chat_model: Any = None,
    index_opener: Callable[[Path], Any] | None = None,
) -> FastAPI:
    """Build the app. Models and index load in the lifespan; pass ``encoder`` / ``chat_model`` to inject."""
    settings = settings or Settings()
    metrics = Metrics()
    service = Service(settings=settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _load(service, encoder, chat_model, index_opener or _open_index)
        service.ready = True
        logger.info(
            "ready: encoder=%s chat=%s index=%s", service.encoder, settings.chat_model, settings.index
        )
        try:
            yield
        finally:
            service.ready = False
            for task in service.background:
                task.cancel()
            for batcher in (service.text_batcher, service.image_batcher):
                if batcher is not None:
                    await batcher.stop()
            for executor in (service.encoder_executor, service.chat_executor):
                if executor is not None:
                    executor.shutdown(wait=False, cancel_futures=True)
            if service.index is not None:
                service.index.close()

    app = FastAPI(
        title="InternVL retrieval service",
        summary="Image/text search, zero-shot classification and grounded chat on InternVL",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    data_routes = (search, duplicates, classify, caption, chat, images, thumbs)
    for module in (*data_routes, admin, health, openai_compat, page):
        app.include_router(module.router)
    openai_compat.install(app)  # OpenAI error envelopes on /v1, limits in the OpenAPI document
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _document_auth(app, required=settings.api_key is not None)
    return app


def _document_auth(app: FastAPI, *, required: bool) -> None:
    """Make the OpenAPI document say what the server enforces: the API-key schemes and their 401 answers
    only when a key is configured; an open server declares no security at all."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        if not required:
            schema.get("components", {}).pop("securitySchemes", None)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if isinstance(operation, dict) and operation.pop("security", None) is not None:
                        operation.get("responses", {}).pop("401", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
