"""QLLaMA: a LLaMA decoder whose learnable query tokens cross-attend to the vision tokens.

Two uses in InternVL-C/G:
- text path: token ids, causal mask + padding mask from ``ids > 0``, no cross-attention;
- query path (InternVL-G): the learnable queries alone, attending to each other without a causal mask,
  plus cross-attention to the vision tokens in layers ``i % cross_attention_frequency == 0``.
Norms, MLP and rotary embedding are transformers' LLaMA blocks; parameter names follow the checkpoint
(``qllama.model.layers.{i}.self_attn.q_proj`` ... ``qllama.lm_head``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from retrieval.internvl.attention import attend
from retrieval.internvl.config import QLLaMAConfig

logger = logging.getLogger(__name__)

#: the reference QLLaMA hard-codes the rotary base (config ``rope_theta`` is not read)
ROPE_BASE = 10000.0


def llama_config(config: QLLaMAConfig) -> LlamaConfig:
    """The transformers LlamaConfig the reused blocks (MLP, rotary embedding) need."""
    if config.rope_theta != ROPE_BASE:
        logger.warning(
            "config rope_theta=%s ignored: the reference QLLaMA uses base %s", config.rope_theta, ROPE_BASE
        )
    return LlamaConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        num_hidden_layers=config.num_hidden_layers,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=ROPE_BASE,
        vocab_size=config.vocab_size,
        mlp_bias=False,
    )


class QLLaMASelfAttention(nn.Module):
    """Multi-head self-attention with rotary position embedding (k/v use all heads, as the reference)."""

    def __init__(self, config: QLLaMAConfig) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        if self.hidden_size % self.num_heads:
            raise ValueError(f"qllama hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        self.head_dim = self.hidden_size // self.num_heads
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Any = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """``cache``: optional transformers ``Cache``; the new keys/values are appended to layer ``layer_idx``
        and attention runs over all cached positions (``mask`` then covers the cached keys too)."""
        b, n, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        out = attend(q, k, v, mask)  # (B, H, N, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.hidden_size))


class QLLaMACrossAttention(nn.Module):
    """Queries (norm1) attend to the vision tokens (norm2), both RMS-normed; no rotary, no mask."""

    def __init__(self, config: QLLaMAConfig, vision_hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.norm1 = LlamaRMSNorm(self.hidden_size, eps=config.rms_norm_eps)
        self.k_proj = nn.Linear(vision_hidden_size, self.hidden_size, bias=False)
        self.v_proj = nn.Linear(vision_hidden_size, self.hidden_size, bias=False)
        self.norm2 = LlamaRMSNorm(vision_hidden_size, eps=config.rms_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def forward(self, x: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self._heads(self.q_proj(self.norm1(x)))  # (B, H, Nq, D)
        vision = self.norm2(vision.to(x.dtype))
        k, v = self._heads(self.k_proj(vision)), self._heads(self.v_proj(vision))  # (B, H, Nv, D)
        out = attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.hidden_size))


class QLLaMADecoderLayer(nn.Module):
    """Self-attention, then (query path, selected layers) cross-attention to vision tokens, then MLP."""

    def __init__(
        self, config: QLLaMAConfig, llama: LlamaConfig, use_cross_attn: bool, vision_hidden_size: int
    ) -> None:
        super().__init__()
        self.self_attn = QLLaMASelfAttention(config)
        self.cross_attn = QLLaMACrossAttention(config, vision_hidden_size) if use_cross_attn else None
        self.mlp = LlamaMLP(llama)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        vision: torch.Tensor | None,
        *,
        cache: Any = None,
        layer_idx: int = 0,
        num_query_token: int | None = None,
    ) -> torch.Tensor:
        """``num_query_token``: None = every position cross-attends (the queries-only embedding path); an int
        = only the first ``num_query_token`` positions do, and only when there are at least that many
        (the reference's rule for a query + prompt sequence: the prompt positions pass through unchanged)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=cache, layer_idx=layer_idx)
        if self.cross_attn is not None and vision is not None:
            if num_query_token is None:
                x = x + self.cross_attn(x, vision)
            elif x.shape[1] >= num_query_token:
                queries = x[:, :num_query_token]
                x = torch.cat([queries + self.cross_attn(queries, vision), x[:, num_query_token:]], dim=1)
        return x + self.mlp(self.post_attention_layernorm(x))


class QLLaMAModel(nn.Module):
    """Token embedding, decoder layers and final RMSNorm (``qllama.model``)."""

    def __init__(self, config: QLLaMAConfig, vision_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.llama_config = llama_config(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        freq = config.cross_attention_frequency
        self.layers = nn.ModuleList(
            QLLaMADecoderLayer(config, self.llama_config, i % freq == 0, vision_hidden_size)
            for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(self.llama_config)

    def reset_rotary(self, device: torch.device | None = None) -> None:
        """Recompute the (non-persistent) rotary frequencies, e.g. after building on the meta device."""
        self.rotary_emb = LlamaRotaryEmbedding(self.llama_config).to(device or self.norm.weight.device)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        *,
        cache: Any = None,
        num_query_token: int | None = None,
    ) -> torch.Tensor:
        """(B, N, H) embeddings -> (B, N, H) final-norm states. ``mask``: bool (B, 1, N, N + cached),
        True = attend. With a ``cache`` (transformers ``Cache``), positions continue after the cached ones
        and the new keys/values are appended; ``num_query_token``: see :meth:`QLLaMADecoderLayer.forward`."""
        x = inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        cos, sin = self.rotary_emb(x, positions)  # (B, N, D)
        for i, layer in enumerate(self.layers):
            x = layer(
                x, cos, sin, mask, vision_hidden_states,
                cache=cache, layer_idx=i, num_query_token=num_query_token,
            )  # fmt: skip
        return self.norm(x)


class QLLaMA(nn.Module):
    """``qllama``: the decoder plus its (unused for embeddings, but stored) LM head."""

    def __init__(self, config: QLLaMAConfig, vision_hidden_size: int) -> None:
        super().__init__()
        self.model = QLLaMAModel(config, vision_hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def text_attention_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """ids (B, N) -> bool (B, 1, N, N): causal and key is a real token (``id > 0``, right padding)."""
    n = input_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()  # (N, N)
    return causal[None, None] & (input_ids > 0)[:, None, None, :]
