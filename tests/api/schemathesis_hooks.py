"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): schema-valid images are real images.

The OpenAPI document says an ``image`` is base64 (``format: byte``) of an image file (``contentMediaType:
image/*``), and multipart uploads are ``image/*``. JSON schema cannot say "decodes as an image", so the
positive phase gets real PNG/JPEG files from here; negative data (non-base64, wrong types) is still fuzzed.
"""

from __future__ import annotations

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _encode(args: tuple[int, int, tuple[int, int, int], str]) -> bytes:
    width, height, color, fmt = args
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


image_files = st.tuples(
    st.integers(1, 48),
    st.integers(1, 48),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    st.sampled_from(["PNG", "JPEG"]),
).map(_encode)

schemathesis.openapi.format("byte", image_files.map(lambda data: base64.b64encode(data).decode()))
schemathesis.openapi.format("binary", image_files)  # multipart file parts
# image_url.url / embeddings image inputs of the /v1 routes: data: URLs of real images
schemathesis.openapi.format(
    "image-data-url", image_files.map(lambda data: "data:image/png;base64," + base64.b64encode(data).decode())
)
