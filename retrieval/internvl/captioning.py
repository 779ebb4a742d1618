"""InternVL-G captioning: QLLaMA behind transformers' ``generate`` (greedy, beam search, sampling).

What the reference ``InternVLModel.generate`` does (see ``tests/fixtures/internvl_cg_tiny/CAPTIONS.md``):
the prompt ``[BOS] + pieces(prompt)`` (no EOS) is embedded, the ``num_query_token`` learned query tokens are
put in front, and QLLaMA decodes from these embeddings with cross-attention to the InternViT tokens:

- first (full-sequence) step: rotary positions ``0..n-1`` over queries + prompt; causal attention except that
  the query block sees itself bidirectionally; in the cross-attention layers only the query positions get the
  cross-attention residual (the reference runs it on a step of at least ``num_query_token`` positions);
- cached steps (one new token): self-attention over the cache, no cross-attention;
- the returned sequences start with the BOS id (the reference's generate puts it in front of the new tokens
  when it is given only embeddings).

:class:`QLLaMAForCaptioning` wraps the model's own ``qllama`` module (shared, not copied: the checkpoint's
parameter names and strict loading are unchanged) as a ``PreTrainedModel`` with ``GenerationMixin``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from retrieval.internvl.model import InternVLModel
from retrieval.internvl.qllama import QLLaMA, llama_config
from retrieval.internvl.tokenizer import InternVLTokenizer

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "English caption:"
#: the name transformers gives the KV cache in model outputs (``cache`` since 5.x, ``past_key_values`` before)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def caption_attention_mask(
    new: int, past: int, num_query_token: int, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask (B or 1, 1, new, past + new), True = attend, or None when every key is visible.

    Causal over absolute positions; on the first step (``past == 0``) with at least ``num_query_token``
    positions, the query block is all-visible (the reference's ``use_zero_attention_mask``). ``key_mask``:
    the 2D (B, past + new) attention mask of ``generate`` (1 = real position)."""
    total = past + new
    mask = None
    if new > 1:
        rows = torch.arange(past, total, device=device)[:, None]
        mask = torch.arange(total, device=device)[None, :] <= rows  # (new, total) causal
        if past == 0 and new >= num_query_token:
            mask[:num_query_token, :num_query_token] = True
        mask = mask[None, None]
    if key_mask is not None and not bool(key_mask.all()):
        keys = key_mask[:, None, None, :total].to(device=device, dtype=torch.bool)
        mask = keys if mask is None else mask & keys
    return mask


class QLLaMAForCaptioning(PreTrainedModel, GenerationMixin):
    """QLLaMA as a causal LM for ``generate``: queries + prompt embeddings in, next-token logits out.

    Holds the InternVL model's ``qllama`` module (same parameters, same names under ``qllama.``); the vision
    tokens arrive as the ``vision_hidden_states`` model kwarg (expanded per beam by ``generate``)."""

    config_class = LlamaConfig
    base_model_prefix = "qllama"
    _supports_cache_class = True

    def __init__(self, config: LlamaConfig, qllama: QLLaMA, num_query_token: int) -> None:
        super().__init__(config)
        self.qllama = qllama
        self.num_query_token = int(num_query_token)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to initialise: the wrapped modules hold the loaded checkpoint."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.qllama.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.qllama.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """One decoding step (or the prefill): logits (B, kept, V) in float32, and the updated cache."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # transformers before the ``cache`` rename
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.qllama.model.embed_tokens(input_ids)
        if use_cache is False:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        mask = caption_attention_mask(
            inputs_embeds.shape[1], past, self.num_query_token, attention_mask, inputs_embeds.device
        )
        # cross-attention only on the first, full-sequence step (the reference's ">= num_query_token
        # positions" rule); cached steps never cross-attend
        vision = vision_hidden_states if past == 0 else None
        hidden = self.qllama.model(
            inputs_embeds, mask=mask, vision_hidden_states=vision,
            cache=cache, num_query_token=self.num_query_token,
        )  # fmt: skip
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.qllama.lm_head(hidden).float()  # float32: no overflow in sampling at low temperature
        return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})


class InternVLCaptioner:
    """Pixels + prompt -> caption token ids (``generate`` output) and texts, with an InternVL-C/G model."""

    def __init__(self, model: InternVLModel, tokenizer: InternVLTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        config = llama_config(model.config.qllama_config)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
        )  # fmt: skip
        config.tie_word_embeddings = False
        self.lm = QLLaMAForCaptioning(config, model.qllama, model.config.num_query_token).eval()
        self.lm.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
        )
        self.special_ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.sp.unk_id()}

    def prompt_embeds(self, prompt: str, batch_size: int) -> torch.Tensor:
        """(B, Q + L, C): the learned queries followed by the embedded prompt ids (BOS, no EOS)."""
        ids = torch.tensor([self.tokenizer.encode_prompt(prompt)], device=self.model.query_tokens.device)
        prompt_embeds = self.model.qllama.model.embed_tokens(ids).expand(batch_size, -1, -1)
        queries = self.model.query_tokens.expand(batch_size, -1, -1)
        return torch.cat([queries, prompt_embeds.to(queries.dtype)], dim=1)

    @torch.inference_mode()
    def generate(
        self,
        pixel_values: torch.Tensor,
        prompt: str = DEFAULT_PROMPT,
        **generate_kwargs: Any,
    ) -> Any:
        """``generate`` output (``return_dict_in_generate``) whose ``sequences`` start with the BOS id.

        ``generate_kwargs`` go to transformers' ``generate`` (``num_beams``, ``do_sample``,
        ``max_new_tokens``, ``output_logits``, ...)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        vision = self.model.vision_tokens(pixel_values)
        embeds = self.prompt_embeds(prompt, pixel_values.shape[0])
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        generate_kwargs.setdefault("return_dict_in_generate", True)
        out = self.lm.generate(
            inputs_embeds=embeds, attention_mask=mask, vision_hidden_states=vision, **generate_kwargs
        )
        sequences = out.sequences if hasattr(out, "sequences") else out
        bos = sequences.new_full((sequences.shape[0], 1), self.tokenizer.bos_id)
        sequences = torch.cat([bos, sequences], dim=1)
        if hasattr(out, "sequences"):
            out.sequences = sequences
            return out
        return sequences

    def decode(self, sequences: torch.Tensor) -> list[str]:
        """Token ids (N, T) -> texts, special tokens (BOS, EOS, pad/unk) skipped."""
        return [
            self.tokenizer.sp.decode([int(i) for i in row if int(i) not in self.special_ids])
            for row in sequences.tolist()
        ]


_BUILD_LOCK = threading.Lock()


def captioner_for(owner: Any, model: InternVLModel, tokenizer: InternVLTokenizer) -> InternVLCaptioner:
    """The captioner cached on ``owner`` (built once, thread-safe)."""
    captioner = getattr(owner, "_captioner", None)
    if captioner is None:
        with _BUILD_LOCK:
            captioner = getattr(owner, "_captioner", None)
            if captioner is None:
                captioner = InternVLCaptioner(model, tokenizer)
                owner._captioner = captioner
    return captioner
