"""InternViT, the InternVL vision tower: patch embedding + class token + ViT blocks (qk-norm, layer scale).

Parameter names follow the checkpoint (``vision_model.embeddings.*``, ``vision_model.encoder.layers.{i}.*``).
The tower has no final norm: its output is the last block's output, token 0 being the class token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from retrieval.internvl.attention import attend
from retrieval.internvl.config import InternVisionConfig

logger = logging.getLogger(__name__)

# InternRMSNorm of the reference is the same computation as LlamaRMSNorm (float32 statistics).
NORMS: dict[str, type[nn.Module]] = {"rms_norm": LlamaRMSNorm, "layer_norm": nn.LayerNorm}


def make_norm(norm_type: str, size: int, eps: float) -> nn.Module:
    """RMSNorm or LayerNorm per the config's ``norm_type``."""
    if norm_type not in NORMS:
        raise ValueError(f"unknown norm_type {norm_type!r}; expected one of {sorted(NORMS)}")
    return NORMS[norm_type](size, eps=eps)


def resize_position_embedding(pos: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """(1, 1+old², C) -> (1, 1+new², C): bicubic resize of the patch grid, class position kept (reference)."""
    cls_pos, grid_pos = pos[:, :1, :], pos[:, 1:, :]
    dim = pos.shape[-1]
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid_pos = F.interpolate(grid_pos.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid_pos = grid_pos.to(cls_pos.dtype).reshape(1, dim, -1).permute(0, 2, 1)  # (1, new², C)
    return torch.cat([cls_pos, grid_pos], dim=1)


class InternVisionEmbeddings(nn.Module):
    """Pixels (B, 3, S, S) -> tokens (B, 1 + (S/p)², C): class token + patch conv + position embedding."""

    def __init__(self, config: InternVisionConfig, image_size: int) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.image_size = image_size
        self.grid = image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid**2, self.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected pixel_values (B, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, C, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, g², C)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(dtype)  # (B, 1+g², C)


class InternAttention(nn.Module):
    """Multi-head self-attention; q and k RMS-normalised over all heads together (not per head)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision hidden_size {self.embed_dim} not divisible by {self.num_heads} heads")
        self.head_dim = self.embed_dim // self.num_heads
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = LlamaRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = LlamaRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x (B, N, H, D)
        if self.qk_normalization:
            q = self.q_norm(q.flatten(-2)).view(b, n, self.num_heads, self.head_dim)
            k = self.k_norm(k.flatten(-2)).view(b, n, self.num_heads, self.head_dim)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    """fc1 -> activation (exact-erf GELU for ``gelu``) -> fc2."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block with layer scale: x + ls1·attn(norm1 x), then x + ls2·mlp(norm2 x)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = make_norm(config.norm_type, dim, config.layer_norm_eps)
        self.norm2 = make_norm(config.norm_type, dim, config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    """The stack of encoder layers (``encoder.layers.{i}``)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class InternVisionModel(nn.Module):
    """InternViT: pixels (B, 3, S, S) -> tokens (B, 1 + (S/p)², C)."""

    def __init__(self, config: InternVisionConfig, image_size: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config, image_size or config.image_size)
        self.encoder = InternVisionEncoder(config)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns (last hidden state, hidden states) where hidden states = (embeddings, block 1, ...)."""
        x = self.embeddings(pixel_values)
        states: list[torch.Tensor] = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            if output_hidden_states:
                states.append(x)
        return x, (tuple(states) if output_hidden_states else None)
