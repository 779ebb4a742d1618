"""``POST /chat``: grounded answers from InternVL-Chat, as JSON or as server-sent events."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, HTTPException, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.deps import AuthDep, ServiceDep
from api.limits import GatedStreamingResponse, on_thread, unless_disconnected, watching
from api.routes import (
    body_with_upload,
    content_type,
    error_responses,
    is_form,
    read_form,
    require_json,
    validate_body,
)
from api.routes.search import _form_image, retrieve_images
from api.schemas import MIN_SAMPLING_TEMPERATURE, ChatRequest, ChatResponse, Source
from api.service import Service, decode_base64_image
from chat.video import VideoDecodeError, probe_video, video_prefix

if TYPE_CHECKING:
    from chat.grounded import Retrieved

logger = logging.getLogger(__name__)
router = APIRouter(tags=["chat"])

_END = object()
_SSE_DOC = (
    'With `stream: true`: `text/event-stream` of `data: {"text": piece}` events, then one '
    '`event: sources` carrying `{"sources": [...]}` (or `event: error` with `{"detail": ...}`).'
)

#: one server-sent event (OpenAPI 3.1: the stream's ``schema`` describes each event)
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string", "enum": ["message", "sources", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": 'JSON: {"text": piece} (message), {"sources": [...]} (sources), '
            '{"detail": ...} (error)',
        },
    },
}


def sse(data: dict, event: str | None = None) -> bytes:
    """One server-sent event with a JSON payload."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _common_kwargs(req: ChatRequest) -> dict[str, Any]:
    return {
        "history": [tuple(turn) for turn in req.history] if req.history else None,
        "max_new_tokens": req.max_new_tokens,
        "max_num_tiles": req.max_num_tiles,
    }


def _temperature(req: ChatRequest) -> float:
    """The request's temperature, with near-zero values (whose limit is greedy decoding) as exactly 0."""
    return req.temperature if req.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0


def _direct_kwargs(req: ChatRequest) -> dict[str, Any]:
    """``ChatModel.chat/stream`` options: temperature 0 means greedy decoding."""
    temperature = _temperature(req)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    return {**_common_kwargs(req), **sampling}


def _question(req: ChatRequest, n_images: int) -> str:
    """With history, ChatModel adds no ``<image>`` placeholder itself: put one per image in the question."""
    turns = [req.question, *(text for turn in req.history or () for text in turn)]
    if req.history and n_images and not any("<image>" in text for text in turns):
        return "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images)) + req.question
    return req.question


def _sources(raw: list[dict]) -> list[dict]:
    return [Source(id=int(s["id"]), path=str(s["path"]), score=float(s["score"])).model_dump() for s in raw]


async def _images(service: Service, req: ChatRequest) -> list[Image.Image] | None:
    if req.images is None:
        return None
    return [
        await service.decode_image(decode_base64_image(b64, f"images[{i}]"))
        for i, b64 in enumerate(req.images)
    ]


#: a decoded request video: ``(pixel_values, num_patches_list)``, one entry per sampled frame
Video = tuple[torch.Tensor, list[int]]


def check_video_limits(service: Service, raw: bytes) -> None:
    """Worker thread: 422 when the video is over the frame or duration limits (demuxes it, decodes nothing;
    raises :class:`VideoDecodeError` when it is not a video)."""
    s = service.settings
    info = probe_video(raw, max_pixels=s.max_pixels)
    if info.frame_count > s.max_video_frames:
        raise HTTPException(
            422, f"the video has {info.frame_count} frames; the limit is {s.max_video_frames}"
        )
    if info.duration > s.max_video_duration_s:
        raise HTTPException(
            422, f"the video is {info.duration:.1f} s long; the limit is {s.max_video_duration_s:g} s"
        )


def _load_video(service: Service, raw: bytes, num_segments: int, max_num_tiles: int | None) -> Video:
    """Worker thread: check the video against the limits (demuxing only), then sample and tile its frames
    exactly as ``ChatModel.chat(video=...)`` does."""
    check_video_limits(service, raw)
    return service.chat_model.load_video(raw, num_segments=num_segments, max_num_tiles=max_num_tiles)


def video_bytes(service: Service, data: str | bytes, field_name: str) -> bytes:
    """A video file's bytes from bytes or base64 (or a ``data:`` URL): 413 over the size limit."""
    raw = data if isinstance(data, bytes) else decode_base64_image(data, field_name)
    limit = service.settings.max_video_bytes
    if len(raw) > limit:
        raise HTTPException(413, f"the video is {len(raw)} bytes; the limit is {limit} bytes")
    return raw


def video_error(exc: VideoDecodeError, field_name: str) -> HTTPException:
    """The 422 of an undecodable video, with its reason."""
    logger.info("rejected a video in %s (%s): %s", field_name, exc.reason, exc)
    return HTTPException(422, {"reason": exc.reason, "message": f"cannot decode the video: {exc}"})


async def decode_video(
    service: Service,
    data: str | bytes,
    field_name: str,
    num_segments: int,
    max_num_tiles: int | None,
    request: Request,
) -> Video:
    """A video file's bytes, or base64 (or a ``data:`` URL) of one -> its sampled, tiled frames, decoded off
    the event loop: 413 over the size limit, 422 over the duration/frame limits or undecodable (with the
    reason)."""
    raw = video_bytes(service, data, field_name)
    try:
        return await unless_disconnected(
            request, run_in_threadpool(_load_video, service, raw, num_segments, max_num_tiles)
        )
    except VideoDecodeError as exc:
        raise video_error(exc, field_name) from exc


async def _video(service: Service, req: ChatRequest, raw: bytes | None, request: Request) -> Video | None:
    """The request's video (its uploaded bytes ``raw``, or base64 in ``video``), if any."""
    if req.video is None:
        return None
    data = raw if raw is not None else req.video
    return await decode_video(service, data, "video", req.num_segments, req.max_num_tiles, request)


# ---------------------------------------------------------------------------------------------- body
#: custom string format of multipart video file parts: schemathesis hooks generate real videos for it
VIDEO_FILE_FORMAT = "video-binary"
_JSON_SCHEMA = ChatRequest.model_json_schema()


def _multipart_schema() -> dict[str, Any]:
    """multipart/form-data: a ``video`` file and the question with the video options (ChatRequest's)."""
    props = _JSON_SCHEMA["properties"]
    fields: dict[str, Any] = {
        name: dict(props[name])
        for name in ("question", "num_segments", "max_new_tokens", "temperature", "stream")
    }
    tiles = props["max_num_tiles"]
    fields["max_num_tiles"] = next(b for b in tiles.get("anyOf", [tiles]) if b.get("type") == "integer")
    fields["video"] = {
        "type": "string", "format": VIDEO_FILE_FORMAT, "contentMediaType": "video/*",
        "description": "the video file (mp4, mkv, webm, ...)",
    }  # fmt: skip
    return {"type": "object", "properties": fields, "required": ["question", "video"],
            "additionalProperties": False}  # fmt: skip


_MULTIPART_SCHEMA = _multipart_schema()
_OPENAPI_BODY = body_with_upload(_JSON_SCHEMA, _MULTIPART_SCHEMA, "video", "video/*")


def _validate(data: dict[str, Any] | bytes) -> ChatRequest:
    return validate_body(ChatRequest, data)


async def _parse(request: Request) -> tuple[ChatRequest, bytes | None]:
    """The request (JSON, or multipart with a ``video`` file) and the uploaded video's bytes, if any."""
    media = content_type(request)
    if is_form(media):
        fields, raw = await read_form(request, _MULTIPART_SCHEMA, "video", "/chat")
        req = _validate(fields)
        if req.video is None:
            raise HTTPException(422, "a multipart /chat request needs a 'video' file")
        if raw is None:
            raw = _form_image(req.video, "video")
        return req, raw
    require_json(media)
    return _validate(await request.body()), None


def _video_question(req: ChatRequest, n_frames: int) -> tuple[str, list[tuple[str, str]] | None]:
    """The model cards' ``Frame1: <image>\n...`` prefix: on the question in the first turn, on the first
    user turn of ``history`` when no turn has placeholders yet."""
    history = [(str(u), str(a)) for u, a in req.history] if req.history else None
    if any("<image>" in text for text in [req.question, *(t for turn in history or () for t in turn)]):
        return req.question, history
    if history is None:
        return video_prefix(n_frames) + req.question, None
    (user, assistant), *rest = history
    return req.question, [(video_prefix(n_frames) + user, assistant), *rest]


def _video_kwargs(req: ChatRequest, video: Video) -> tuple[str, dict[str, Any]]:
    """``ChatModel.chat/stream`` arguments for an answer about a decoded video."""
    question, history = _video_question(req, len(video[1]))
    pixels = {"pixel_values": video[0], "num_patches_list": video[1]}
    return question, {**_direct_kwargs(req), "history": history, **pixels}


def _started(pieces: Iterator[str]) -> Iterator[str]:
    """Pull the first piece now, so bad input fails before the response status is sent."""
    pieces = iter(pieces)
    first = next(pieces, _END)

    def rest() -> Iterator[str]:
        try:
            if first is not _END:
                yield first
                yield from pieces
        finally:  # closing this generator stops the model's generation too
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    return rest()


def _prepare(
    service: Service,
    req: ChatRequest,
    images: list[Image.Image] | None,
    retrieved: Retrieved | None,
    video: Video | None = None,
) -> tuple[list[dict], Iterator[str]]:
    """Runs on the chat thread: the start of generation (over the retrieved images when no images)."""
    sources, pieces = _start_stream(service, req, images, retrieved, video)
    return sources, _started(pieces)


def _start_stream(
    service: Service,
    req: ChatRequest,
    images: list[Image.Image] | None,
    retrieved: Retrieved | None,
    video: Video | None = None,
) -> tuple[list[dict], Iterator[str]]:
    if video is not None:
        question, kwargs = _video_kwargs(req, video)
        return [], service.chat_model.stream(question, **kwargs)
    if images is not None:
        pieces = service.chat_model.stream(_question(req, len(images)), images=images, **_direct_kwargs(req))
        return [], pieces
    from chat.grounded import stream_answer

    holder = service.require_index()
    return stream_answer(
        req.question,
        index=holder.current,
        encoder=service.encoder,
        chat_model=service.chat_model,
        k=req.k,
        temperature=_temperature(req),
        retrieved=retrieved,
        **_common_kwargs(req),
    )


def _answer(
    service: Service,
    req: ChatRequest,
    images: list[Image.Image] | None,
    retrieved: Retrieved | None,
    video: Video | None = None,
) -> dict:
    """Runs on the chat thread: the whole non-streamed answer."""
    if video is not None:
        question, kwargs = _video_kwargs(req, video)
        return {"answer": service.chat_model.chat(question, **kwargs), "sources": []}
    if images is not None:
        text = service.chat_model.chat(_question(req, len(images)), images=images, **_direct_kwargs(req))
        return {"answer": text, "sources": []}
    from chat.grounded import answer

    holder = service.require_index()
    return answer(
        req.question,
        index=holder.current,
        encoder=service.encoder,
        chat_model=service.chat_model,
        k=req.k,
        temperature=_temperature(req),
        retrieved=retrieved,
        **_common_kwargs(req),
    )


async def _event_stream(service: Service, sources: list[dict], pieces: Iterator[str]) -> AsyncIterator[bytes]:
    try:
        while True:
            piece = await service.run_chat(next, pieces, _END)
            if piece is _END:
                break
            yield sse({"text": piece})
        yield sse({"sources": _sources(sources)}, event="sources")
    except Exception:  # the status line is already sent: report in-band
        logger.exception("chat stream failed")
        yield sse({"detail": "generation failed"}, event="error")
    finally:
        close = getattr(pieces, "close", None)
        if close is not None and service.chat_executor is not None:
            # stops generation early when the client went away; queued behind any running next() on the
            # chat thread, and not awaited: this task may already be cancelled
            service.chat_executor.submit(close)


@router.post(
    "/chat",
    response_model=ChatResponse,
    dependencies=[AuthDep],
    description=_SSE_DOC + " A video can also be uploaded as a multipart/form-data `video` file.",
    openapi_extra=_OPENAPI_BODY,
    responses={
        200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}},
        **error_responses(400, 401, 413, 415, 422, 429, 503),
    },
)
async def chat(request: Request, service: ServiceDep) -> Any:
    """Answer ``question`` from ``images``, a ``video`` (base64, or a multipart file; ``num_segments``
    frames) or from the top ``k`` indexed images (``sources``)."""
    req, raw = await _parse(request)
    if service.chat_model is None:
        raise HTTPException(
            503, "chat is not configured: start the server with --chat-model PATH (IVL_CHAT_MODEL)"
        )
    service.chat_gate.acquire()
    streaming = False
    try:
        images = await _images(service, req)
        video = await _video(service, req, raw, request)
        retrieved: Retrieved | None = None
        if images is None and video is None:  # retrieval: micro-batched encoding, index-thread search
            service.require_encoder()
            index = service.require_index().current
            retrieved = await unless_disconnected(
                request, retrieve_images(service, index, req.question, req.k)
            )
        cancelled = threading.Event()  # set when the client leaves: its queued chat work is dropped
        if req.stream:
            starting = service.run_chat(
                on_thread, cancelled, _prepare, service, req, images, retrieved, video
            )
            sources, pieces = await watching(request, cancelled, starting)
            streaming = True
            return GatedStreamingResponse(
                _event_stream(service, sources, pieces),
                service.chat_gate,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        answering = service.run_chat(on_thread, cancelled, _answer, service, req, images, retrieved, video)
        out = await watching(request, cancelled, answering)
    except ValueError as exc:  # the chat model rejects the input combination (tiles, placeholders, ...)
        raise HTTPException(422, f"cannot answer this request: {exc}") from exc
    finally:
        if not streaming:
            service.chat_gate.release()
    return ChatResponse(answer=out["answer"], sources=[Source(**s) for s in _sources(out["sources"])])
