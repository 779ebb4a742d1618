"""OpenCLIP models from a local folder (``open_clip_config.json`` + weights) through ``open_clip`` itself.

Nothing is downloaded: the model is built with open_clip's ``local-dir:`` schema, which reads the config and
weights from the folder (safetensors, or a ``.bin`` through ``torch.load(weights_only=True)``, strict load).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageOps

from retrieval.errors import (
    CaptioningNotSupportedError,
    ModelLoadError,
    TokenizerNotFoundError,
    WeightMismatchError,
)
from retrieval.images import to_rgb
from retrieval.torch_encoder import TorchEncoder, check_batch_size, check_texts, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


#: modes PIL's ``convert("RGB")`` mangles (clips to 0..255): rescaled to 8 bit first
HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I", "F"})


class OpenCLIPImageTransform:
    """EXIF orientation, then open_clip's own eval transform (picklable).

    open_clip resizes first and converts to RGB last (an RGBA image is resized with its alpha), so the image
    is handed over in its own mode for identical pixels; only high-bit modes are converted here.
    """

    def __init__(self, inner: Callable[[Image.Image], torch.Tensor]) -> None:
        self.inner = inner

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        image = ImageOps.exif_transpose(image)
        return self.inner(to_rgb(image) if image.mode in HIGH_BIT_MODES else image)


class OpenCLIPEncoder(TorchEncoder):
    """An open_clip model behind the :class:`~retrieval.base.Encoder` interface."""

    mode = "openclip"

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        name: str,
        embed_dim: int,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.embed_dim = embed_dim
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.image_transform = OpenCLIPImageTransform(preprocess)

    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Preprocessed batch (B, 3, S, S) -> open_clip's normalised image features, float32 (B, D)."""
        if len(pixel_values) == 0:
            return self._empty()
        with torch.inference_mode():
            feats = self.model.encode_image(self._to_model(pixel_values), normalize=True)
        return feats.float().cpu().numpy()

    def caption(
        self, images: Sequence[object], prompt: str = "English caption:", **kwargs: object
    ) -> list[str]:
        """Not available: a CLIP model has no text decoder."""
        raise CaptioningNotSupportedError(
            f"{self.name}: OpenCLIP models cannot caption images (no text decoder); "
            "use an InternVL-C/G checkpoint for captions"
        )

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Texts -> open_clip's normalised text features, float32 (N, D)."""
        check_batch_size(batch_size)
        texts = check_texts(texts)
        out = [self._empty()]
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out, axis=0)


def _weight_error(source: str, message: str) -> WeightMismatchError:
    """torch's strict-load RuntimeError text -> :class:`WeightMismatchError` with the names listed."""

    def names(label: str) -> list[str]:
        found = re.search(label + r" key\(s\) in state_dict: (.*?)\.\s*(?:\n|$|Unexpected)", message, re.S)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    mismatched = re.findall(r"size mismatch for ([^:]+):", message)
    return WeightMismatchError(source, names("Missing"), names("Unexpected"), mismatched)


def load_openclip_encoder(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> OpenCLIPEncoder:
    """Build the model of an OpenCLIP folder with open_clip and load its local weights strictly."""
    folder = Path(path).resolve()
    try:
        model_cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]
        embed_dim = int(model_cfg["embed_dim"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{folder}/open_clip_config.json: no valid 'model_cfg.embed_dim' ({exc})"
        ) from exc
    dev = resolve_device(device)
    spec = f"local-dir:{folder}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec, device="cpu")
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        if "Error(s) in loading state_dict" in str(exc):
            raise _weight_error(str(folder), str(exc)) from exc
        raise ModelLoadError(f"{folder}: open_clip cannot build the model ({exc})") from exc
    try:
        tokenizer = open_clip.get_tokenizer(spec)
    except OSError as exc:
        raise TokenizerNotFoundError(f"{folder}: cannot load the OpenCLIP tokenizer ({exc})") from exc
    model = model.to(device=dev, dtype=resolve_dtype(dtype, dev))
    logger.info("loaded OpenCLIP %s on %s", folder.name, dev)
    return OpenCLIPEncoder(model, preprocess, tokenizer, name=f"{folder.name}:openclip", embed_dim=embed_dim)
