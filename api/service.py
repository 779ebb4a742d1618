"""What the routes share: loaded models, the index holder, batchers, executors and metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import HTTPException
from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.batching import MicroBatcher
from api.index_holder import IndexHolder
from api.limits import Gate
from api.metrics import Metrics
from api.settings import Settings
from retrieval.base import Encoder
from retrieval.images import open_image

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_base64_image(data: str, field_name: str = "image") -> bytes:
    """Base64 text (optionally a ``data:...;base64,`` URL) -> raw bytes, or a 422 naming the field."""
    text = _DATA_URL.sub("", data.strip(), count=1)
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(422, f"'{field_name}' is not valid base64: {exc}") from exc
    if not raw:
        raise HTTPException(422, f"'{field_name}' is empty after base64 decoding")
    return raw


@dataclass
class Service:
    """State held in ``app.state.service`` for the lifetime of the app."""

    settings: Settings
    metrics: Metrics
    encoder: Encoder | None = None
    chat_model: Any = None
    index: IndexHolder | None = None
    encoder_executor: ThreadPoolExecutor | None = None
    chat_executor: ThreadPoolExecutor | None = None
    text_batcher: MicroBatcher | None = None
    image_batcher: MicroBatcher | None = None
    ready: bool = False
    background: list[asyncio.Task] = field(default_factory=list)
    encode_gate: Gate = field(init=False)
    chat_gate: Gate = field(init=False)

    def __post_init__(self) -> None:
        self.encode_gate = Gate("encode", self.settings.max_queued_encodes)
        self.chat_gate = Gate("chat", self.settings.max_queued_chats)

    def setup_chat_executor(self) -> None:
        """The one chat thread: chat requests queue for it, in order (with or without an encoder)."""
        if self.chat_executor is None:
            self.chat_executor = ThreadPoolExecutor(1, thread_name_prefix="ivl-chat")

    def setup_batchers(self) -> None:
        """Create the executors and the text / image micro-batchers around ``self.encoder``."""
        s = self.settings
        self.encoder_executor = ThreadPoolExecutor(s.encoder_threads, thread_name_prefix="ivl-encoder")
        self.setup_chat_executor()
        encoder = self.encoder
        assert encoder is not None

        def encode_texts(texts: Sequence[str]) -> np.ndarray:
            return encoder.encode_texts(list(texts), batch_size=max(len(texts), 1))

        def encode_pixels(tensors: Sequence[torch.Tensor]) -> np.ndarray:
            return encoder.encode_pixels(torch.stack(list(tensors)))

        common = dict(
            executor=self.encoder_executor,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            enabled=s.batching,
            on_batch=self.metrics.observe_batch,
        )
        self.text_batcher = MicroBatcher(encode_texts, name="text", **common)
        self.image_batcher = MicroBatcher(encode_pixels, name="image", **common)

    # ---- encoding -------------------------------------------------------------------------------

    def require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise HTTPException(503, "no encoder model is configured (start with --model PATH / IVL_MODEL)")
        return self.encoder

    def require_index(self) -> IndexHolder:
        if self.index is None or self.index.current is None:
            raise HTTPException(503, "no index is configured (start with --index DIR / IVL_INDEX)")
        return self.index

    async def decode_image(self, raw: bytes) -> Image.Image:
        """Bytes -> RGB PIL image in a worker thread (422 on bad or oversized images via the handler)."""
        return await run_in_threadpool(open_image, raw, max_pixels=self.settings.max_pixels)

    async def embed_text(self, text: str) -> np.ndarray:
        """One text -> ``(D,)`` through the text micro-batcher."""
        self.require_encoder()
        assert self.text_batcher is not None
        return await self.text_batcher.submit(text)

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Many texts -> ``(N, D)`` through the text micro-batcher, in chunks of ``max_batch_size``."""
        self.require_encoder()
        assert self.text_batcher is not None
        return await self.text_batcher.submit_many(list(texts))

    async def embed_image_bytes(self, raw: bytes) -> np.ndarray:
        """Image file bytes -> ``(D,)``: decode and preprocess in a worker thread, encode batched."""
        encoder = self.require_encoder()
        assert self.image_batcher is not None

        def load(data: bytes) -> torch.Tensor:
            return encoder.preprocess(open_image(data, max_pixels=self.settings.max_pixels))

        pixels = await run_in_threadpool(load, raw)
        return await self.image_batcher.submit(pixels)

    async def run_encoder(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an unbatched encoder call (e.g. zero-shot classification) on the encoder thread."""
        return await asyncio.get_running_loop().run_in_executor(self.encoder_executor, fn, *args)

    async def run_chat(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking chat-model call on the chat thread."""
        return await asyncio.get_running_loop().run_in_executor(self.chat_executor, fn, *args)

    # ---- index ----------------------------------------------------------------------------------

    async def indexed_row(self, index: Any, image_id: int) -> dict:
        """The index row of ``image_id`` or a 404."""
        holder = self.require_index()
        row = (await holder.run(index.get, [image_id]))[0]
        if row is None:
            raise HTTPException(404, f"image_id {image_id} is not in the index")
        return row
