"""InternVL-C / InternVL-G (InternVL-14B-224px): config, model, tokenizer and transforms.

Own implementation of the official clip_benchmark code (no library ships it); parameter names equal the
checkpoint's so published weights load with ``strict=True``.
"""

from retrieval.internvl.captioning import InternVLCaptioner, QLLaMAForCaptioning
from retrieval.internvl.config import InternVisionConfig, InternVLConfig, QLLaMAConfig
from retrieval.internvl.model import InternVLModel
from retrieval.internvl.tokenizer import InternVLTokenizer
from retrieval.internvl.transforms import IMAGENET_MEAN, IMAGENET_STD, InternVLImageTransform, build_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InternVLCaptioner",
    "InternVLConfig",
    "InternVLImageTransform",
    "InternVLModel",
    "InternVLTokenizer",
    "InternVisionConfig",
    "QLLaMAForCaptioning",
    "QLLaMAConfig",
    "build_transform",
]
