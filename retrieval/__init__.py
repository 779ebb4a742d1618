"""Image/text embedding encoders (InternVL-C, InternVL-G, OpenCLIP) behind one interface."""

from retrieval.base import Encoder
from retrieval.loader import load_encoder

__all__ = ["Encoder", "load_encoder"]
