"""Grounded answers: retrieve the top-k images for a question, then let InternVL-Chat answer about them.

The question is embedded with the retrieval encoder, ``index.search`` finds the k nearest images, the
readable ones are opened (:func:`retrieval.images.open_image`; unreadable files are skipped with a logged
warning), tiled, and passed to the chat model as ``Image-1: <image>\\nImage-2: <image>\\n...`` + question.
The answer comes back with the ``id`` / ``path`` / ``score`` of the images actually used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from chat.model import MIN_SAMPLING_TEMPERATURE
from retrieval.images import ImageDecodeError, open_image

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"(Image-\d+: )?<image>\n?")
#: images and their ``{"id", "path", "score"}`` sources, retrieved already
Retrieved = tuple[Sequence[Image.Image], Sequence[dict[str, Any]]]


@dataclass
class GroundedRequest:
    """What retrieval produced for one question: the prompt, the tiles and the sources used."""

    question: str
    history: list[tuple[str, str]] | None
    pixel_values: torch.Tensor | None
    num_patches_list: list[int]
    sources: list[dict[str, Any]]


def _clean_history(history: Sequence[Sequence[str]] | None) -> list[tuple[str, str]] | None:
    """Earlier turns without image placeholders: their images are not sent again, new ones are."""
    if history is None:
        return None
    turns = []
    for turn in history:
        if len(turn) != 2:
            raise ValueError(f"history turns must be (question, answer) pairs, got {turn!r}")
        turns.append((_PLACEHOLDER.sub("", str(turn[0])), str(turn[1])))
    return turns


def retrieve_images(
    question: str, *, index: Any, encoder: Any, k: int
) -> tuple[list[Image.Image], list[dict]]:
    """Top-k images for ``question``: opened PIL images and their ``{"id", "path", "score"}`` sources."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(index) == 0:
        logger.warning("index is empty: answering without images")
        return [], []
    query = encoder.encode_texts([question])
    _, scores, rows = index.search(query, int(k))
    images, sources, skipped = [], [], 0
    for rank, row in enumerate(rows[0] if rows else []):
        if row is None:
            continue
        score = float(row.get("score", scores[0][rank]))
        try:
            images.append(open_image(row["path"]))
        except (ImageDecodeError, KeyError) as exc:
            skipped += 1
            logger.warning("skipping retrieved image id=%s path=%s: %s", row.get("id"), row.get("path"), exc)
            continue
        sources.append({"id": int(row["id"]), "path": str(row["path"]), "score": score})
    if skipped:
        logger.warning("%d of %d retrieved images were unreadable and skipped", skipped, len(rows[0]))
    return images, sources


def prepare(
    question: str,
    *,
    index: Any,
    encoder: Any,
    chat_model: Any,
    k: int = 3,
    history: Sequence[Sequence[str]] | None = None,
    max_num_tiles: int | None = None,
    retrieved: Retrieved | None = None,
) -> GroundedRequest:
    """Retrieve (unless ``retrieved`` already holds the images and sources), tile the images and build the
    ``Image-1..k`` question."""
    if retrieved is None:
        images, sources = retrieve_images(question, index=index, encoder=encoder, k=k)
    else:
        images, sources = list(retrieved[0]), list(retrieved[1])
    pixel_values, patches = None, []
    if images:
        pixel_values, patches = chat_model.tile_images(images, max_num_tiles)
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images))) + question
    return GroundedRequest(question, _clean_history(history), pixel_values, patches, sources)


def _generation_kwargs(max_new_tokens: int, temperature: float) -> dict[str, Any]:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    sample = temperature >= MIN_SAMPLING_TEMPERATURE  # below it, sampling's limit: greedy
    return {"max_new_tokens": int(max_new_tokens), "do_sample": sample, "temperature": temperature or 1.0}


def _generate(
    method: str,
    question: str,
    *,
    index: Any,
    encoder: Any,
    chat_model: Any,
    k: int,
    history: Sequence[Sequence[str]] | None,
    max_new_tokens: int,
    temperature: float,
    max_num_tiles: int | None,
    system_message: str | None = None,
    retrieved: Retrieved | None = None,
) -> tuple[list[dict[str, Any]], Any]:
    """Retrieve, then call ``chat_model.<method>`` ("chat" or "stream") on the retrieved images.

    The prompt carries the chat model's system message (the checkpoint's), or ``system_message``.
    ``retrieved``: images and sources retrieved already (e.g. by the server, off this thread).
    """
    gen = _generation_kwargs(max_new_tokens, temperature)
    if system_message is not None:
        gen["system_message"] = system_message
    req = prepare(
        question,
        index=index,
        encoder=encoder,
        chat_model=chat_model,
        k=k,
        history=history,
        max_num_tiles=max_num_tiles,
        retrieved=retrieved,
    )
    out = getattr(chat_model, method)(
        req.question,
        history=req.history,
        pixel_values=req.pixel_values,
        num_patches_list=req.num_patches_list or None,
        **gen,
    )
    return req.sources, out


def answer(
    question: str,
    *,
    index: Any,
    encoder: Any,
    chat_model: Any,
    k: int = 3,
    history: Sequence[Sequence[str]] | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    max_num_tiles: int | None = None,
    system_message: str | None = None,
    retrieved: Retrieved | None = None,
) -> dict[str, Any]:
    """Answer ``question`` grounded on the top-k retrieved images: ``{"answer", "sources"}``.

    ``temperature`` 0 is greedy decoding; above 0 samples with that temperature. ``system_message``
    replaces the checkpoint's system message for this answer. ``retrieved``: ``(images, sources)`` already
    retrieved for ``question`` (then ``index`` and ``encoder`` are not used).
    """
    sources, text = _generate(
        "chat", question, index=index, encoder=encoder, chat_model=chat_model, k=k, history=history,
        max_new_tokens=max_new_tokens, temperature=temperature, max_num_tiles=max_num_tiles,
        system_message=system_message, retrieved=retrieved,
    )  # fmt: skip
    return {"answer": text, "sources": sources}


def stream_answer(
    question: str,
    *,
    index: Any,
    encoder: Any,
    chat_model: Any,
    k: int = 3,
    history: Sequence[Sequence[str]] | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    max_num_tiles: int | None = None,
    system_message: str | None = None,
    retrieved: Retrieved | None = None,
) -> tuple[list[dict[str, Any]], Iterator[str]]:
    """Like :func:`answer`, for server-sent events: ``(sources, iterator of text pieces)``.

    Retrieval happens now (errors raise here); text is generated while the iterator is consumed.
    """
    return _generate(
        "stream", question, index=index, encoder=encoder, chat_model=chat_model, k=k, history=history,
        max_new_tokens=max_new_tokens, temperature=temperature, max_num_tiles=max_num_tiles,
        system_message=system_message, retrieved=retrieved,
    )  # fmt: skip
