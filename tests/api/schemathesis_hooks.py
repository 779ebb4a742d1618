"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): schema-valid images are real images,
schema-valid videos (formats ``video-byte``, ``video-data-url``, ``video-binary``) real videos.

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

VIDEO_FORMAT = "video-byte"  # api.schemas.VIDEO_FORMAT (this module is imported without the project path)


def _encode(args: tuple[int, int, tuple[int, int, int], str]) -> bytes:
    width, height, color, fmt = args
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def _encode_video(args: tuple[int, int, str]) -> bytes:
    """A tiny square clip: one tile per frame whatever max_num_tiles is (small squares are not split)."""
    import av
    import numpy as np

    frames, side, codec = args
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4" if codec == "libx264" else "matroska") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.full((side, side, 3), (37 * i) % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
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
# ChatRequest.video: base64 of real (tiny) videos
video_files = st.tuples(st.integers(1, 12), st.sampled_from([16, 32]), st.sampled_from(["libx264", "mpeg4"]))
schemathesis.openapi.format(
    VIDEO_FORMAT, video_files.map(_encode_video).map(lambda data: base64.b64encode(data).decode())
)
# video_url.url of /v1/chat/completions: data: URLs of real (tiny) videos
schemathesis.openapi.format(
    "video-data-url",
    video_files.map(_encode_video).map(
        lambda data: f"data:video/mp4;base64,{base64.b64encode(data).decode()}"
    ),
)
# multipart /chat: the video file part itself
schemathesis.openapi.format("video-binary", video_files.map(_encode_video))
