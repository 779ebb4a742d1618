"""OpenAI-compatible ``/v1`` routes: models, chat completions (with images, streaming, retrieval) and
embeddings, computing exactly what :class:`chat.model.ChatModel` and the encoder compute.

Errors on ``/v1`` use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` so that OpenAI
clients raise their typed exceptions; the other routes keep ``{"detail": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import AuthDep, ServiceDep
from api.errors import _clean_errors
from api.limits import GatedStreamingResponse, unless_disconnected, watching
from api.openai_schemas import (
    DATA_URL_PATTERN,
    VIDEO_DATA_URL_PATTERN,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Choice,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorEnvelope,
    ImagePart,
    ModelCard,
    ModelList,
    SystemMessage,
    TextPart,
    Usage,
    VideoPart,
)
from api.routes.chat import Video, decode_video
from api.schemas import MIN_SAMPLING_TEMPERATURE, Source
from api.service import Service, decode_base64_image
from chat.video import video_prefix
from retrieval.images import ImageDecodeError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

PREFIX = "/v1/"
_END = object()
_CREATED = int(time.time())
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
_DESCRIPTIONS = {
    400: "invalid request (bad field, n != 1, a limit exceeded, URL not allowed)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body or video too large",
    422: "undecodable image or video, or over the pixel, video duration or frame limits",
    429: "overloaded: too many requests queued; retry after Retry-After seconds",
    503: "model or index not configured",
}
_SSE_CHUNK = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "JSON chat.completion.chunk objects, then the text [DONE]",
        }
    },
}


class OpenAIError(HTTPException):
    """An HTTP error with OpenAI's ``param`` and ``code``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(status, message, headers=headers)
        self.param = param
        self.code = code


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {
            "model": ErrorEnvelope,
            "description": _DESCRIPTIONS.get(code, "error"),
            **({"headers": {"Retry-After": {"schema": {"type": "string"}}}} if code == 429 else {}),
        }
        for code in codes
    }


# ---------------------------------------------------------------------------------------------- errors
def envelope(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body."""
    kind = _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _is_v1(request: Request) -> bool:
    return request.url.path.startswith(PREFIX) or request.url.path == PREFIX.rstrip("/")


def install(app: FastAPI) -> None:
    """Route ``/v1`` errors to OpenAI envelopes (others keep their handlers) and make the OpenAPI document
    state this server's limits (allowed media hosts, embedding width)."""
    original = dict(app.exception_handlers)

    async def on_http(request: Request, exc: StarletteHTTPException) -> Any:
        if not _is_v1(request):
            return await original[StarletteHTTPException](request, exc)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        codes = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
        return JSONResponse(
            envelope(
                exc.status_code, detail, param=getattr(exc, "param", None),
                code=getattr(exc, "code", None) or codes.get(exc.status_code),
            ),
            status_code=exc.status_code,
            headers=exc.headers,
        )  # fmt: skip

    async def on_validation(request: Request, exc: RequestValidationError) -> Any:
        if not _is_v1(request):
            return await original[RequestValidationError](request, exc)
        errors = _clean_errors(list(exc.errors()))
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        loc = [str(x) for x in first["loc"] if x != "body"]
        message = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in errors[:5])
        return JSONResponse(envelope(400, message, param=".".join(loc) or None), status_code=400)

    async def on_image(request: Request, exc: ImageDecodeError) -> Any:
        if not _is_v1(request):
            return await original[ImageDecodeError](request, exc)
        return JSONResponse(envelope(422, str(exc), code="invalid_image"), status_code=422)

    async def on_error(request: Request, exc: Exception) -> Any:
        if not _is_v1(request):
            return await original[Exception](request, exc)
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(envelope(500, "internal server error"), status_code=500)

    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ImageDecodeError, on_image)
    app.add_exception_handler(Exception, on_error)

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        service: Service = app.state.service
        defs = schema.get("components", {}).get("schemas", {})
        if service.encoder is not None and "EmbeddingRequest" in defs:
            dims = defs["EmbeddingRequest"]["properties"]["dimensions"]
            for branch in dims.get("anyOf", [dims]):
                if branch.get("type") == "integer":
                    branch["minimum"] = branch["maximum"] = int(service.encoder.embed_dim)
        for name, served in (
            ("ChatCompletionRequest", chat_model_id(service)),
            ("EmbeddingRequest", encoder_id(service)),
        ):
            if served is not None and name in defs:  # the one model id each route serves
                defs[name]["properties"]["model"] = {
                    "type": "string",
                    "enum": [served],
                    "description": "GET /v1/models",
                }
        limit = service.settings.max_tokens_limit
        request_schema = defs.get("ChatCompletionRequest", {}).get("properties", {})
        for name in ("max_tokens", "max_completion_tokens"):
            for branch in request_schema.get(name, {}).get("anyOf", []):
                if branch.get("type") == "integer":
                    branch["maximum"] = min(branch.get("maximum", limit), limit)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------- models
def _folder_id(path: str | None) -> str | None:
    if not path:
        return None
    if path == "demo":
        return "demo"
    return Path(path.rstrip("/\\")).name or None


def chat_model_id(service: Service) -> str | None:
    """The chat model's id: ``served_model_name``, else its folder's name."""
    if service.chat_model is None:
        return None
    s = service.settings
    return s.served_model_name or _folder_id(s.chat_model) or str(getattr(service.chat_model, "name", "chat"))


def encoder_id(service: Service) -> str | None:
    """The encoder's id: ``served_encoder_name``, else its folder's name."""
    if service.encoder is None:
        return None
    s = service.settings
    return s.served_encoder_name or _folder_id(s.model) or str(service.encoder.name)


@router.get("/models", response_model=ModelList, dependencies=[AuthDep], responses=_responses(401))
async def list_models(service: ServiceDep) -> ModelList:
    """The served models, the chat model first."""
    ids = [i for i in (chat_model_id(service), encoder_id(service)) if i is not None]
    return ModelList(data=[ModelCard(id=i, created=_CREATED, owned_by="internvl") for i in ids])


def _check_model(given: str, served: str | None, kind: str) -> None:
    if served is None:
        raise OpenAIError(503, f"no {kind} model is configured on this server", code="model_not_configured")
    if given != served:
        raise OpenAIError(
            404, f"the model '{given}' does not exist; the {kind} model is '{served}'", param="model",
            code="model_not_found",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- images
async def _fetch(service: Service, url: str, param: str) -> bytes:
    """An http(s) image from an allowed host: a timeout and the body limit."""
    import httpx

    limit = service.settings.max_body_bytes
    try:
        async with httpx.AsyncClient(timeout=service.settings.media_fetch_timeout_s) as client:
            async with client.stream("GET", url, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise OpenAIError(
                        400, f"fetching the image gave HTTP {response.status_code}", param=param
                    )
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise OpenAIError(413, f"the image at the URL is over {limit} bytes", param=param)
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise OpenAIError(400, f"could not fetch the image: {exc}", param=param) from exc
    return b"".join(chunks)


async def _load_image(service: Service, url: str, param: str) -> Image.Image:
    """A data: URL decoded, or an http(s) URL of an allowed host fetched; anything else is a 400."""
    if re.match(DATA_URL_PATTERN, url):
        raw = decode_base64_image(url, param)
    elif url.lower().startswith(("http://", "https://")):
        host = (urlsplit(url).hostname or "").lower()
        allowed = {d.lower() for d in service.settings.allowed_media_domains}
        if host not in allowed:
            raise OpenAIError(
                400,
                f"image URLs are not fetched from '{host}': send a data:image/...;base64 URL "
                "(or allow the host with IVL_ALLOWED_MEDIA_DOMAINS)",
                param=param, code="url_not_allowed",
            )  # fmt: skip
        raw = await _fetch(service, url, param)
    else:
        raise OpenAIError(400, "image_url.url must be a data:image/...;base64,... URL", param=param)
    return await service.decode_image(raw)


# ---------------------------------------------------------------------------------------------- chat
@dataclass
class _Plan:
    """A conversation in ChatModel's terms."""

    question: str
    history: list[tuple[str, str]] | None
    images: list[Image.Image | Video]  # images and decoded videos (their tiled frames), in prompt order
    max_tiles: list[int | None]
    system_message: str | None
    last_text: str
    sources: list[dict] = field(default_factory=list)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content if isinstance(part, TextPart))


def _prefix(media: list[Image.Image | Video]) -> str:
    """The model cards' conventions: ``<image>\\n`` for one image, ``Image-i: <image>\\n`` for several,
    ``Frame1: <image>\\n...FrameN: <image>\\n`` for a video (one placeholder per sampled frame)."""
    if len(media) == 1 and isinstance(media[0], Image.Image):
        return "<image>\n"
    out, n_images = [], 0
    for item in media:
        if isinstance(item, Image.Image):
            n_images += 1
            out.append(f"Image-{n_images}: <image>\n")
        else:
            out.append(video_prefix(len(item[1])))
    return "".join(out)


async def _load_video(service: Service, part: VideoPart, param: str, request: Request) -> Video:
    """A ``video_url`` part's data: URL sampled and tiled as ``ChatModel.chat(video=...)`` does, with /chat's
    size, duration and frame limits; errors are OpenAI envelopes naming the part."""
    url = part.video_url.url
    if re.match(VIDEO_DATA_URL_PATTERN, url) is None:
        raise OpenAIError(400, "video_url.url must be a data:video/...;base64,... URL", param=param)
    wanted = part.video_url.max_dynamic_patch
    tiles = 1 if wanted is None else min(wanted, service.settings.max_dynamic_patch_limit)
    try:
        return await decode_video(service, url, param, part.video_url.num_segments, tiles, request)
    except HTTPException as exc:
        detail = exc.detail
        message = detail["message"] if isinstance(detail, dict) else str(detail)
        code = (
            "invalid_video"
            if isinstance(detail, dict)
            else "video_too_large"
            if exc.status_code == 413
            else "video_over_limit"
        )
        raise OpenAIError(exc.status_code, message, param=param, code=code) from exc


async def _plan(service: Service, req: ChatCompletionRequest, request: Request) -> _Plan:
    """Messages -> (question, history, images in order, system message); consecutive same-role messages
    are joined, a missing user turn is an empty question."""
    s = service.settings
    systems: list[str] = []
    turns: list[list[Any]] = []  # [role, texts, image parts]
    for i, msg in enumerate(req.messages):
        if isinstance(msg, SystemMessage):
            systems.append(_text_of(msg.content))
            continue
        role = "assistant" if isinstance(msg, AssistantMessage) else "user"
        if not turns or turns[-1][0] != role:
            turns.append([role, [], []])
        if isinstance(msg.content, str):
            turns[-1][1].append(msg.content)
        else:
            texts = [p.text for p in msg.content if isinstance(p, TextPart)]
            if texts:
                turns[-1][1].append("\n".join(texts))
            turns[-1][2].extend(
                (f"messages.{i}.content.{j}.{p.type}", p)
                for j, p in enumerate(msg.content) if isinstance(p, ImagePart | VideoPart)
            )  # fmt: skip
    n_images = sum(len(t[2]) for t in turns)
    if n_images > s.max_images_per_request:
        raise OpenAIError(
            400, f"{n_images} images and videos in this request; the limit is {s.max_images_per_request}",
            param="messages", code="too_many_images",
        )  # fmt: skip
    pairs: list[tuple[str, str]] = []
    question, last_text = "", ""
    pending: str | None = None
    images: list[Image.Image | Video] = []
    max_tiles: list[int | None] = []
    for role, texts, parts in turns:
        text = "\n".join(texts)
        if role == "user":
            media: list[Image.Image | Video] = []
            for param, part in parts:
                if isinstance(part, VideoPart):
                    media.append(await _load_video(service, part, param, request))
                    max_tiles.append(None)
                    continue
                media.append(await _load_image(service, part.image_url.url, param))
                wanted = part.image_url.max_dynamic_patch
                max_tiles.append(None if wanted is None else min(wanted, s.max_dynamic_patch_limit))
            images.extend(media)
            last_text = text
            pending = (_prefix(media) if media and "<image>" not in text else "") + text
        else:
            pairs.append((pending if pending is not None else "", text))
            pending = None
    if pending is not None:
        question = pending
    else:
        last_text = ""
    system = "\n".join(systems) if systems else None
    return _Plan(question, pairs or None, images, max_tiles, system, last_text)


async def _retrieve(service: Service, plan: _Plan, k: int) -> None:
    """The ``retrieval`` extension: the question's top-k indexed images replace the request's images,
    as /chat does; the text is encoded through the micro-batcher and searched on the index thread."""
    from api.routes.search import retrieve_images
    from chat.grounded import _clean_history

    holder = service.require_index()
    service.require_encoder()
    plan.history = _clean_history(plan.history)
    text = plan.last_text
    images, sources = await retrieve_images(service, holder.current, text, k)
    plan.images, plan.max_tiles, plan.sources = images, [None] * len(images), sources
    plan.question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images))) + text


class _StopFilter:
    """Cuts streamed text at the first stop string, holding back what could be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buffer += piece
        found = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buffer, self.hit = self.buffer[: min(found)], "", True
            return out
        cut = len(self.buffer) - self.hold
        if cut <= 0:
            return ""
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass
class _Run:
    """One generation on the chat thread: its pieces and what usage needs."""

    pieces: Iterator[str]
    prompt_tokens: int
    generated: list[int]
    stop_token_id: int
    max_new_tokens: int
    first: Any = _END


def _start(service: Service, plan: _Plan, req: ChatCompletionRequest, cancelled: threading.Event) -> _Run:
    """Chat thread: tile, build the prompt as ChatModel.chat does, start generating, take the first piece."""
    if cancelled.is_set():
        raise _Dropped()
    model = service.chat_model
    s = service.settings
    pixel_values, patches = None, None
    if plan.images:
        tiled = [
            model.tile_images([img], m) if isinstance(img, Image.Image) else img
            for img, m in zip(plan.images, plan.max_tiles, strict=True)
        ]
        pixel_values = torch.cat([t[0] for t in tiled])
        patches = [n for t in tiled for n in t[1]]
        n_image_tiles = sum(
            n for img, t in zip(plan.images, tiled, strict=True) if isinstance(img, Image.Image) for n in t[1]
        )  # video frames are bounded by num_segments and the tile limit per frame, as on /chat
        if n_image_tiles > s.max_tiles_per_request:
            raise OpenAIError(
                400, f"{n_image_tiles} image tiles in this request; the limit is {s.max_tiles_per_request}",
                param="messages", code="too_many_tiles",
            )  # fmt: skip
    try:
        query, pixel_values = model.prepare(
            plan.question, history=plan.history, pixel_values=pixel_values, num_patches_list=patches,
            system_message=plan.system_message,
        )  # fmt: skip
    except ValueError as exc:
        raise OpenAIError(400, f"cannot build the prompt: {exc}", param="messages") from exc
    max_new = req.max_completion_tokens or req.max_tokens or min(512, s.max_tokens_limit)
    if max_new > s.max_tokens_limit:
        raise OpenAIError(
            400, f"max_tokens {max_new} is over this server's limit of {s.max_tokens_limit}",
            param="max_tokens", code="max_tokens_too_large",
        )  # fmt: skip
    temperature = req.temperature or 0.0
    sample = temperature >= MIN_SAMPLING_TEMPERATURE
    config = model.generation_config(
        max_new_tokens=max_new, do_sample=sample, temperature=temperature if sample else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
    )  # fmt: skip
    if sample and req.seed is not None:
        torch.manual_seed(req.seed & (2**64 - 1))
    generated: list[int] = []
    pieces = model.stream_prompt(query, pixel_values, config, generated)
    run = _Run(pieces, model.prompt_length(query), generated, int(model.stop_token_id), max_new)
    run.first = next(pieces, _END)
    return run


class _Dropped(Exception):
    """The client went away before its work reached the model."""


def _finish_reason(run: _Run, stopped: bool) -> str:
    if stopped or (run.generated and run.generated[-1] == run.stop_token_id):
        return "stop"
    return "length" if len(run.generated) >= run.max_new_tokens else "stop"


def _complete(run: _Run, stops: list[str], cancelled: threading.Event) -> tuple[str, bool]:
    """Chat thread: the rest of a non-streamed answer, cut at stop strings; stops early if the client left."""
    filt = _StopFilter(stops)
    parts: list[str] = []
    piece = run.first
    try:
        while piece is not _END and not filt.hit and not cancelled.is_set():
            parts.append(filt.feed(piece))
            piece = next(run.pieces, _END)
    finally:
        run.pieces.close()  # type: ignore[attr-defined]
    if not filt.hit:
        parts.append(filt.flush())
    return "".join(parts), filt.hit


async def _on_chat_thread(service: Service, request: Request, cancelled: threading.Event,
                          fn: Callable[..., Any], *args: Any) -> Any:  # fmt: skip
    """Run ``fn`` on the chat thread while watching for a disconnect (which sets ``cancelled``)."""
    return await watching(request, cancelled, service.run_chat(fn, *args))


def _stops(req: ChatCompletionRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def _chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage: dict | None = None,
           include_usage: bool = False) -> bytes:  # fmt: skip
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }  # fmt: skip
    if include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def _event_stream(
    service: Service, run: _Run, req: ChatCompletionRequest, cid: str, model: str, sources: list[dict]
) -> AsyncIterator[bytes]:
    include = bool(req.stream_options and req.stream_options.include_usage)
    filt = _StopFilter(_stops(req))
    try:
        yield _chunk(cid, model, {"role": "assistant", "content": ""}, include_usage=include)
        piece = run.first
        while piece is not _END and not filt.hit:
            text = filt.feed(piece)
            if text:
                yield _chunk(cid, model, {"content": text}, include_usage=include)
            piece = await service.run_chat(next, run.pieces, _END)
        rest = "" if filt.hit else filt.flush()
        if rest:
            yield _chunk(cid, model, {"content": rest}, include_usage=include)
        yield _chunk(cid, model, {}, _finish_reason(run, filt.hit), include_usage=include)
        if include:
            usage = _usage(run).model_dump()
            body = {
                "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [], "usage": usage,
            }  # fmt: skip
            if sources:
                body["sources"] = sources
            yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    except Exception:  # the status line is already sent: report in-band
        logger.exception("chat completion stream failed")
        yield f"data: {json.dumps(envelope(500, 'generation failed'))}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:  # the gate slot is released by the response (GatedStreamingResponse)
        if service.chat_executor is not None:  # stops generation when the client went away
            service.chat_executor.submit(run.pieces.close)  # type: ignore[attr-defined]


def _usage(run: _Run) -> Usage:
    return Usage(
        prompt_tokens=run.prompt_tokens,
        completion_tokens=len(run.generated),
        total_tokens=run.prompt_tokens + len(run.generated),
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    dependencies=[AuthDep],
    description="OpenAI chat completions with images and videos (`image_url` / vLLM's `video_url` parts, "
    "data: URLs); `stream: true` answers server-sent "
    "`chat.completion.chunk` events ending with `data: [DONE]`. Extension: `retrieval: {k}` answers over "
    "the top-k indexed images and returns them in `sources`.",
    responses={
        200: {"content": {"text/event-stream": {"schema": _SSE_CHUNK}}},
        **_responses(400, 401, 404, 413, 422, 429, 503),
    },
)
async def chat_completions(req: ChatCompletionRequest, request: Request, service: ServiceDep) -> Any:
    """Answer the conversation with the served chat model, as ``ChatModel.chat`` does."""
    if service.chat_model is None:
        raise OpenAIError(
            503, "chat is not configured: start the server with --chat-model PATH (IVL_CHAT_MODEL)",
            code="model_not_configured",
        )  # fmt: skip
    served = chat_model_id(service)
    _check_model(req.model, served, "chat")
    limit = service.settings.max_tokens_limit
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value > limit:
            raise OpenAIError(400, f"{name} {value} is over this server's limit of {limit}", param=name)
    service.chat_gate.acquire()
    streaming = False
    try:
        plan = await _plan(service, req, request)
        if req.retrieval is not None:
            await _retrieve(service, plan, req.retrieval.k)
        cancelled = threading.Event()
        try:
            run = await _on_chat_thread(service, request, cancelled, _start, service, plan, req, cancelled)
        except _Dropped:
            logger.info("client went away before generation: dropped")
            raise OpenAIError(400, "client disconnected") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        sources = [Source(**s).model_dump() for s in plan.sources]
        if req.stream:
            streaming = True
            return GatedStreamingResponse(
                _event_stream(service, run, req, cid, served or "", sources),
                service.chat_gate,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, hit = await _on_chat_thread(service, request, cancelled, _complete, run, _stops(req), cancelled)
        return ChatCompletion(
            id=cid,
            created=int(time.time()),
            model=served or "",
            choices=[
                Choice(index=0, message=ChatMessageOut(content=text), finish_reason=_finish_reason(run, hit))
            ],
            usage=_usage(run),
            sources=[Source(**s) for s in sources] if req.retrieval is not None else None,
        )
    finally:
        if not streaming:
            service.chat_gate.release()


# ---------------------------------------------------------------------------------------------- embeddings
async def _embed(service: Service, req: EmbeddingRequest) -> np.ndarray:
    encoder = service.require_encoder()
    items = req.items
    if req.modality == "text":
        if len(items) == 1:
            return (await service.embed_text(items[0]))[None]
        return await service.run_encoder(lambda: encoder.encode_texts(items))
    images = [
        await service.decode_image(decode_base64_image(item, f"input[{i}]")) for i, item in enumerate(items)
    ]
    if len(images) == 1:
        assert service.image_batcher is not None
        pixels = await asyncio.to_thread(encoder.preprocess, images[0])
        return (await service.image_batcher.submit(pixels))[None]
    return await service.run_encoder(lambda: encoder.encode_images(images))


@router.post(
    "/embeddings",
    response_model=EmbeddingList,
    dependencies=[AuthDep],
    description="Embeddings of texts, or of images (`modality: image`, data: URLs); float32, L2-normalised.",
    responses=_responses(400, 401, 404, 413, 422, 429, 503),
)
async def embeddings(req: EmbeddingRequest, request: Request, service: ServiceDep) -> EmbeddingList:
    """``Encoder.encode_texts`` / ``encode_images`` of the inputs, in order."""
    served = encoder_id(service)
    _check_model(req.model, served, "embedding")
    encoder = service.require_encoder()
    if req.dimensions is not None and req.dimensions != encoder.embed_dim:
        raise OpenAIError(
            400, f"dimensions must be {encoder.embed_dim} for this model (got {req.dimensions})",
            param="dimensions",
        )  # fmt: skip
    with service.encode_gate.slot():  # a disconnected client's queued batcher items are skipped
        vectors = np.asarray(await unless_disconnected(request, _embed(service, req)), dtype=np.float32)
    data = [
        Embedding(
            index=i,
            embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
            if req.encoding_format == "base64"
            else v.tolist(),
        )  # fmt: skip
        for i, v in enumerate(vectors)
    ]
    return EmbeddingList(data=data, model=served or "", usage=EmbeddingUsage(prompt_tokens=0, total_tokens=0))
