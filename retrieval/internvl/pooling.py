"""Attention-pooling projectors: ``clip_projector`` (vision tokens), ``clip_projector2`` (QLLaMA queries).

The query is the mean of all tokens (class token included); keys and values are the tokens themselves, each
through its own LayerNorm (eps 1e-5, hard-coded in the reference); one multi-head cross-attention, then a
linear projection to the embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.internvl.attention import attend

#: LayerNorm epsilon of the pooling blocks (hard-coded in the reference, not in the config)
POOL_NORM_EPS = 1e-5


class PoolingCrossAttention(nn.Module):
    """Cross-attention with bias-free q/k/v weights plus separate ``q_bias``/``k_bias``/``v_bias`` vectors."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"pooling width {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
        b, n, _ = x_q.shape
        q = self._heads(F.linear(x_q, self.q.weight, self.q_bias))  # (B, H, Nq, D)
        k = self._heads(F.linear(x_k, self.k.weight, self.k_bias))  # (B, H, Nk, D)
        v = self._heads(F.linear(x_v, self.v.weight, self.v_bias))
        out = attend(q, k, v)  # (B, H, Nq, D)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, Nq, out_dim)


class AttentionPoolingBlock(nn.Module):
    """Tokens (B, N, C) -> one pooled embedding (B, out_dim)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=POOL_NORM_EPS)
        self.norm1_k = nn.LayerNorm(dim, eps=POOL_NORM_EPS)
        self.norm1_v = nn.LayerNorm(dim, eps=POOL_NORM_EPS)
        self.cross_attn = PoolingCrossAttention(dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = x.mean(1, keepdim=True)  # (B, 1, C)
        out = self.cross_attn(self.norm1_q(query), self.norm1_k(x), self.norm1_v(x))  # (B, 1, out_dim)
        return out.squeeze(1)
