"""Zero-shot classification over any :class:`~retrieval.base.Encoder`: a pure function of encoder and labels.

A class embedding is the renormalised mean of its normalised template embeddings; probabilities are
``softmax(logit_scale * cosine)`` over the labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from retrieval.base import Encoder
from retrieval.torch_encoder import ImageInput
from retrieval.zero_shot_templates import DEFAULT_TEMPLATES

logger = logging.getLogger(__name__)


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("templates must not be empty")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"every template must be a str containing '{{}}' for the label; bad: {bad[:5]}")
    return templates


def label_prompts(labels: Sequence[str], templates: Sequence[str] | None = None) -> list[str]:
    """Labels (L) x templates (T) -> the L*T text prompts, label-major."""
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of str, got a single str")
    labels = list(labels)
    if not labels:
        raise ValueError("labels must not be empty")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise ValueError("labels must be non-empty strings")
    templates = _check_templates(DEFAULT_TEMPLATES if templates is None else templates)
    return [t.replace("{}", label) for label in labels for t in templates]  # (L*T)


def pool_class_embeddings(text: np.ndarray, n_labels: int) -> np.ndarray:
    """Prompt embeddings (L*T, D) from :func:`label_prompts` -> L2-normalised class embeddings (L, D)."""
    text = np.asarray(text).reshape(n_labels, len(text) // n_labels, -1)  # (L, T, D)
    mean = text.mean(axis=1)  # (L, D)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)


def class_embeddings(
    encoder: Encoder, labels: Sequence[str], templates: Sequence[str] | None = None
) -> np.ndarray:
    """Labels (L) x templates (T) -> L2-normalised class embeddings float32 (L, D)."""
    prompts = label_prompts(labels, templates)
    return pool_class_embeddings(encoder.encode_texts(prompts), len(labels))


def probabilities(logit_scale: float, feats: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Normalised image embeddings (N, D) x class embeddings (L, D) -> probabilities float32 (N, L)."""
    if feats.ndim != 2 or feats.shape[1] != classes.shape[1]:
        raise ValueError(f"image embeddings must be (N, {classes.shape[1]}), got {feats.shape}")
    return softmax(logit_scale * feats.astype(np.float32, copy=False) @ classes.T)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable, float32."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def classify(
    encoder: Encoder,
    images: Sequence[ImageInput] | np.ndarray,
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
) -> np.ndarray:
    """Images (PIL, paths, or precomputed normalised embeddings (N, D)) -> probabilities float32 (N, L)."""
    classes = class_embeddings(encoder, labels, templates)
    feats = images if isinstance(images, np.ndarray) else encoder.encode_images(list(images))
    return probabilities(encoder.logit_scale, feats, classes)
