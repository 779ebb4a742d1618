"""Token-by-token decoding (KV cache, in the caller's thread) and incremental detokenisation for streaming.

The pieces :func:`incremental_text` yields concatenate to exactly the answer that ``chat()`` returns
(decoded with special tokens skipped, cut at the separator, stripped): text is released only once it can
no longer change (no trailing whitespace that a final ``strip`` could remove, no half-decoded UTF-8
character, no partial separator).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

logger = logging.getLogger(__name__)


class NewTokensRepetitionPenalty(LogitsProcessor):
    """``repetition_penalty`` over the generated tokens only (not the prompt), as the reference applies it:
    its LLM ``generate()`` gets ``inputs_embeds`` only, so it never sees the prompt ids."""

    def __init__(self, penalty: float, prompt_length: int) -> None:
        self.inner = RepetitionPenaltyLogitsProcessor(penalty)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.inner(input_ids[:, self.prompt_length :], scores)


def logits_processors(config: GenerationConfig, prompt_length: int) -> LogitsProcessorList:
    """The processors ``generate()`` applies for ``config``, in its order (penalty, temperature, top-k,
    top-p), the repetition penalty restricted to new tokens."""
    out = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        out.append(NewTokensRepetitionPenalty(config.repetition_penalty, prompt_length))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            out.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            out.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=config.top_p))
    return out


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument taking the KV cache: ``cache`` (newer transformers), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_cache(output: Any) -> Any:
    """The KV cache of a forward's output, under either of transformers' names for it."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.inference_mode()
def iter_new_tokens(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    pixel_values: torch.Tensor | None = None,
) -> Iterator[int]:
    """Greedy or sampled decoding of one prompt ``(1, L)`` with a KV cache, yielding each new token id as
    soon as it is chosen; stops after ``config.eos_token_id`` or ``max_new_tokens`` tokens.

    Same forward passes and token selection as ``generate()`` (prefill with the image tiles, then one
    cached step per token), but as a generator: text can be streamed without a worker thread.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("iter_new_tokens decodes one prompt at a time")
    stop = config.eos_token_id
    stop_ids = set(stop if isinstance(stop, list) else [] if stop is None else [stop])
    processors = logits_processors(config, input_ids.shape[1])
    mask = torch.ones_like(input_ids)
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **extra)
    cache_arg = cache_kwarg(model)
    ids = input_ids
    for step in range(int(config.max_new_tokens)):
        scores = processors(ids, out.logits[:, -1].to(dtype=torch.float32, device=ids.device))
        if config.do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
        else:
            token = torch.argmax(scores, dim=-1)
        yield int(token)
        if int(token) in stop_ids or step + 1 == config.max_new_tokens:
            return
        ids = torch.cat([ids, token[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones((1, 1))], dim=-1)
        out = model(
            input_ids=token[:, None], attention_mask=mask, use_cache=True, **{cache_arg: kv_cache(out)}
        )


class AnswerDecoder:
    """``decode(ids, skip_special_tokens=True)`` as the reference tokenizer (transformers 4.37, slow) did.

    Only the special-tokens map (bos/eos/unk/pad + additional special tokens) is skipped; other added
    tokens (e.g. Phi-3's ``<|user|>`` when not in the map) stay as text, and the text segments around them
    are joined with a space (``spaces_between_special_tokens``). Without such tokens this equals the
    tokenizer's own decode of the non-special ids.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.kept = {i: t for t, i in tokenizer.get_added_vocab().items() if i not in self.special}

    def __call__(self, ids: Iterable[int]) -> str:
        texts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special:
                continue
            if i in self.kept:
                self._flush(run, texts)
                texts.append(self.kept[i])
            else:
                run.append(i)
        self._flush(run, texts)
        return " ".join(texts)

    def _flush(self, run: list[int], texts: list[str]) -> None:
        if run:
            text = self.tokenizer.decode(run, skip_special_tokens=False)
            if text:
                texts.append(text)
            run.clear()


def _stable_end(text: str, stop: str) -> str:
    """``text`` without what may still change: trailing whitespace, replacement chars, a partial separator."""
    text = text.rstrip().rstrip("\ufffd").rstrip()
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop and text.endswith(stop[:k]):
            return text[:-k].rstrip()
    return text


def incremental_text(
    token_ids: Iterable[int], decode: Callable[[list[int]], str], template: Any, stop_token_id: int
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
        text = decode(ids)
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
    final = template.postprocess(decode(ids))
    if final.startswith(emitted):
        if len(final) > len(emitted):
            yield final[len(emitted) :]
    else:  # decoding changed already-released text (should not happen with sentencepiece / byte-level BPE)
        logger.warning("streamed text %r diverged from the final answer %r", emitted, final)
