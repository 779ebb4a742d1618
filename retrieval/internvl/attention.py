"""Scaled dot-product attention: flash-attn where usable (Ampere+, half precision, importable), else SDPA."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from retrieval.devices import flash_attn_importable, flash_attn_usable

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _flash_attn_func() -> Callable[..., torch.Tensor] | None:
    """``flash_attn.flash_attn_func`` if the package is installed and imports, else None (checked once)."""
    if not flash_attn_importable():
        return None
    from flash_attn import flash_attn_func

    logger.info("flash-attn kernels available")
    return flash_attn_func


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(head_dim)``.

    q: (B, H, Nq, D), k/v: (B, H, Nk, D), mask: optional bool (B, 1, Nq, Nk), True = attend.
    Returns (B, H, Nq, D).
    """
    flash = _flash_attn_func()
    if flash is not None and mask is None and q.shape[-1] <= 256 and flash_attn_usable(q.device, q.dtype):
        # flash-attn wants (B, N, H, D)
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
