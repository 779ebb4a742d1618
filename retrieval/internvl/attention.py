"""Scaled dot-product attention: flash-attn when installed and applicable, PyTorch SDPA otherwise."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _flash_attn_func() -> Callable[..., torch.Tensor] | None:
    """``flash_attn.flash_attn_func`` if the package is installed, else None (checked once)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:  # installed but broken (ABI mismatch): fall back to SDPA
        logger.warning("flash-attn is installed but cannot be imported (%s); using PyTorch SDPA", exc)
        return None
    logger.info("using flash-attn kernels")
    return flash_attn_func


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(head_dim)``.

    q: (B, H, Nq, D), k/v: (B, H, Nk, D), mask: optional bool (B, 1, Nq, Nk), True = attend.
    Returns (B, H, Nq, D).
    """
    flash = _flash_attn_func()
    if (
        flash is not None
        and mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
    ):
        # flash-attn wants (B, N, H, D)
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
