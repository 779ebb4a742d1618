"""InternVL-C and InternVL-G behind the common :class:`~retrieval.base.Encoder` interface."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.base import l2_normalize
from retrieval.errors import ModelLoadError
from retrieval.internvl.captioning import DEFAULT_PROMPT, InternVLCaptioner, captioner_for
from retrieval.internvl.model import InternVLModel
from retrieval.internvl.tokenizer import InternVLTokenizer
from retrieval.internvl.transforms import build_transform
from retrieval.torch_encoder import (
    ImageInput,
    TorchEncoder,
    check_batch_size,
    check_texts,
    resolve_device,
    resolve_dtype,
)

logger = logging.getLogger(__name__)


class InternVLEncoder(TorchEncoder):
    """Shared text side and plumbing; subclasses choose the image embedding (C or G)."""

    mode = "internvl"

    def __init__(
        self,
        model: InternVLModel,
        tokenizer: InternVLTokenizer,
        *,
        name: str,
        transform: str = "retrieval",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.embed_dim = model.config.clip_embed_dim
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.image_size = model.config.image_size
        self.set_transform(transform)

    def set_transform(self, kind: str) -> None:
        """Switch preprocessing between the "retrieval" (default) and "classification" transforms."""
        self.transform_kind = kind
        self.image_transform = build_transform(kind, self.image_size)

    def _image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Preprocessed batch (B, 3, S, S) -> L2-normalised float32 (B, D)."""
        if len(pixel_values) == 0:
            return self._empty()
        with torch.inference_mode():
            return l2_normalize(self._image_embeds(self._to_model(pixel_values)))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Texts (any language; empty allowed; truncated to 80 tokens) -> L2-normalised float32 (N, D)."""
        check_batch_size(batch_size)
        texts = check_texts(texts)
        out = [self._empty()]
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                ids = self.tokenizer(texts[start : start + batch_size])
                # drop all-padding tail columns: the text tower is causal, so real positions are unchanged
                ids = ids[:, : int((ids > 0).sum(1).max())].to(self.device)
                out.append(l2_normalize(self.model.encode_text(ids)))
        return np.concatenate(out, axis=0)

    # ---- captioning (InternVL-G's QLLaMA decoder; any mode) ------------------------------------------
    @property
    def captioner(self) -> InternVLCaptioner:
        """The QLLaMA ``generate`` wrapper, built on first use."""
        return captioner_for(self, self.model, self.tokenizer)

    def _pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
            raise TypeError("caption expects a sequence of images; wrap a single image in a list")
        return torch.stack([self.preprocess(im) for im in images])

    def generate_captions(
        self,
        images: Sequence[ImageInput],
        prompt: str = DEFAULT_PROMPT,
        *,
        num_beams: int = 5,
        min_new_tokens: int = 8,
        max_new_tokens: int = 30,
        **generate_kwargs: Any,
    ) -> Any:
        """Like :meth:`caption`, but transformers' ``generate`` output: ``sequences`` (BOS id first, then the
        new tokens, as the reference returns them), plus ``logits`` / ``scores`` / ``sequences_scores`` when
        asked for (``output_logits=True``, ...)."""
        return self.generate_captions_from_pixels(
            self._pixels(images), prompt, num_beams=num_beams, min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens, **generate_kwargs,
        )  # fmt: skip

    def generate_captions_from_pixels(
        self, pixel_values: torch.Tensor, prompt: str = DEFAULT_PROMPT, **generate_kwargs: Any
    ) -> Any:
        """Preprocessed batch (B, 3, S, S) -> ``generate`` output (see :meth:`generate_captions`).

        ``min_new_tokens`` is capped at ``max_new_tokens`` (a short caption rather than a warning)."""
        generate_kwargs.setdefault("return_dict_in_generate", True)
        low, high = generate_kwargs.get("min_new_tokens"), generate_kwargs.get("max_new_tokens")
        if low is not None and high is not None and low > high:
            generate_kwargs["min_new_tokens"] = high
        return self.captioner.generate(self._to_model(pixel_values), prompt, **generate_kwargs)

    def caption_pixels(
        self,
        pixel_values: torch.Tensor,
        prompt: str = DEFAULT_PROMPT,
        *,
        num_beams: int = 5,
        min_new_tokens: int = 8,
        max_new_tokens: int = 30,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Preprocessed batch (B, 3, S, S) -> one caption per image (see :meth:`caption`)."""
        if len(pixel_values) == 0:
            return []
        out = self.generate_captions_from_pixels(
            pixel_values, prompt, num_beams=num_beams, min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens, **generate_kwargs,
        )  # fmt: skip
        return self.captioner.decode(out.sequences)

    can_caption = True

    def caption(
        self,
        images: Sequence[ImageInput],
        prompt: str = DEFAULT_PROMPT,
        *,
        num_beams: int = 5,
        min_new_tokens: int = 8,
        max_new_tokens: int = 30,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Images (PIL, paths or bytes; preprocessed with this encoder's transform) -> one caption each.

        InternVL-G captioning as the reference ``InternVLModel.generate``: QLLaMA with the learned query
        tokens cross-attending to the InternViT tokens, decoded by transformers' ``generate`` (beam search by
        default; ``num_beams=1`` greedy; ``do_sample=True`` with ``temperature`` / ``top_p`` / ``top_k``
        sampling). Works in either mode (C or G): both checkpoints carry the decoder."""
        images = list(images) if not isinstance(images, (str, bytes, os.PathLike)) else images
        if isinstance(images, list) and not images:
            return []
        return self.caption_pixels(
            self._pixels(images), prompt, num_beams=num_beams, min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens, **generate_kwargs,
        )  # fmt: skip


class InternVLCEncoder(InternVLEncoder):
    """InternVL-C: attention pooling over the InternViT tokens."""

    mode = "internvl-c"

    def _image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image_c(pixel_values)


class InternVLGEncoder(InternVLEncoder):
    """InternVL-G: InternVL-C embedding plus the QLLaMA query branch (sum of both normalised)."""

    mode = "internvl-g"

    def _image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image_g(pixel_values)


ENCODERS: dict[str, type[InternVLEncoder]] = {"internvl-c": InternVLCEncoder, "internvl-g": InternVLGEncoder}


def load_internvl_encoder(
    path: str | os.PathLike,
    *,
    mode: str = "internvl-c",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    transform: str = "retrieval",
) -> InternVLEncoder:
    """Load an InternVL-C/G model folder (config.json, safetensors weights, tokenizer.model)."""
    if mode not in ENCODERS:
        raise ValueError(f"unknown InternVL mode {mode!r}; expected one of {sorted(ENCODERS)}")
    folder = Path(path)
    tokenizer = InternVLTokenizer.from_pretrained(folder)  # checked first: cheap, clear error
    dev = resolve_device(device)
    model = InternVLModel.from_pretrained(folder, device=dev, dtype=resolve_dtype(dtype, dev))
    if tokenizer.vocab_size > model.config.qllama_config.vocab_size:
        raise ModelLoadError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} pieces but the model vocab is only "
            f"{model.config.qllama_config.vocab_size}: wrong tokenizer.model?"
        )
    name = f"{folder.resolve().name}:{mode}"
    logger.info("loaded %s on %s (%s)", name, dev, model.logit_scale.dtype)
    return ENCODERS[mode](model, tokenizer, name=name, transform=transform)
