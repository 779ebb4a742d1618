"""Default English prompt templates for zero-shot classification (``{}`` is replaced by the label).

A compact subset of the CLIP ImageNet prompt ensemble; pass your own (any language) to ``classify``.
"""

from __future__ import annotations

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a blurry photo of a {}.",
    "a good photo of a {}.",
    "a rendering of a {}.",
    "a drawing of a {}.",
    "a painting of a {}.",
    "a sculpture of a {}.",
    "art of the {}.",
    "a black and white photo of the {}.",
    "itap of a {}.",
)
