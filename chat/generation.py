"""Streaming helpers: a token queue fed by ``generate()`` in a worker thread, and incremental detokenisation.

The pieces :func:`incremental_text` yields concatenate to exactly the answer that ``chat()`` returns
(decoded with special tokens skipped, cut at the separator, stripped): text is released only once it can
no longer change (no trailing whitespace that a final ``strip`` could remove, no half-decoded UTF-8
character, no partial separator).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

_END = object()


class GenerationCancelled(Exception):
    """Raised inside ``generate()`` (from the streamer) when the consumer stopped reading."""


class TokenQueueStreamer(BaseStreamer):
    """``generate(streamer=...)`` target: new token ids go to a queue read by :meth:`tokens`."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._cancelled = threading.Event()
        self._prompt_seen = False
        self._error: BaseException | None = None

    def put(self, value: torch.Tensor) -> None:
        """Called by generate(): first with the prompt ids (skipped), then with each new token (batch 1)."""
        if self._cancelled.is_set():
            raise GenerationCancelled()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._queue.put(int(token))

    def end(self) -> None:
        """Called by generate() when it finishes."""
        self._queue.put(_END)

    def cancel(self) -> None:
        """Ask generate() to stop at its next token."""
        self._cancelled.set()

    def run(self, generate: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``generate(*args, streamer=self, **kwargs)``; errors are re-raised in the reading thread."""
        try:
            generate(*args, streamer=self, **kwargs)
        except GenerationCancelled:
            logger.debug("generation cancelled by the reader")
        except Exception as exc:  # handed to the consumer thread, re-raised there by tokens()
            self._error = exc
        finally:
            self._queue.put(_END)

    def tokens(self) -> Iterator[int]:
        """Token ids as they are generated; raises the worker's exception, if any, at the end."""
        while True:
            item = self._queue.get()
            if item is _END:
                break
            yield item
        if self._error is not None:
            raise self._error


def _stable_end(text: str, stop: str) -> str:
    """``text`` without what may still change: trailing whitespace, replacement chars, a partial separator."""
    text = text.rstrip().rstrip("\ufffd").rstrip()
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop and text.endswith(stop[:k]):
            return text[:-k].rstrip()
    return text


def incremental_text(
    token_ids: Iterable[int], tokenizer: PreTrainedTokenizerBase, template: Any, stop_token_id: int
) -> Iterator[str]:
    """Generated ids -> text pieces adding up to ``template.postprocess(decode(ids))``."""
    stop = template.stop_token
    ids: list[int] = []
    emitted = ""
    cut = False
    for token in token_ids:
        ids.append(token)
        if cut:
            continue
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if stop and stop in text:  # the separator was spelled out: the answer ends here
            cut = True
            text = text.split(stop)[0]
        stable = text.lstrip() if cut else _stable_end(text.lstrip(), stop)
        if cut:
            stable = stable.rstrip()
        if len(stable) > len(emitted) and stable.startswith(emitted):
            yield stable[len(emitted) :]
            emitted = stable
        if token == stop_token_id:
            break
    final = template.postprocess(tokenizer.decode(ids, skip_special_tokens=True))
    if final.startswith(emitted):
        if len(final) > len(emitted):
            yield final[len(emitted) :]
    else:  # decoding changed already-released text (should not happen with sentencepiece / byte-level BPE)
        logger.warning("streamed text %r diverged from the final answer %r", emitted, final)
