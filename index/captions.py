"""Caption pass of a build: a caption per indexed image (per video: of its middle frame), stored with
:meth:`index.index.Index.set_captions`.

Only rows without a caption are captioned, in batches committed one by one, so an interrupted pass loses
at most one batch and a re-run continues where it stopped. Unreadable files are logged and skipped (they
stay uncaptioned). The encoder must have ``caption(images, prompt, ...)`` (InternVL checkpoints);
OpenCLIP encoders have no text decoder and raise.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from PIL import Image
from tqdm import tqdm

from chat.video import VIDEO_EXTENSIONS, VideoDecodeError, VideoReader
from retrieval.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "English caption:"
DEFAULT_BATCH_SIZE = 8


def _middle_frame(path: str, max_pixels: int | None) -> Image.Image:
    with VideoReader(path, max_pixels=max_pixels) as reader:
        middle = reader.info.max_frame // 2
        for _, frame in reader.frames([middle]):
            return Image.fromarray(frame).convert("RGB")
    raise VideoDecodeError(f"{path}: no frame {middle}", reason="undecodable")


def load_picture(row: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image of a row: the file itself, or a video's middle frame."""
    path = str(row["path"])
    is_video = (row.get("kind") or "image") != "image" or any(
        path.lower().endswith(e) for e in VIDEO_EXTENSIONS
    )
    return _middle_frame(path, max_pixels) if is_video else open_image(path, max_pixels=max_pixels)


def caption_index(
    index: Any,
    encoder: Any,
    *,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    **generate_kwargs: Any,
) -> tuple[int, list[tuple[str, str, str]]]:
    """Caption the rows of ``index`` (a writer) that have none. Returns ``(captioned, skipped)`` with
    ``skipped`` as ``(path, reason, message)``."""
    if batch_size < 1:
        raise ValueError(f"caption batch size must be >= 1, got {batch_size}")
    index.lock_for_writing()
    total = index.uncaptioned_count()
    skipped: list[tuple[str, str, str]] = []
    done, after = 0, -1
    bar = tqdm(total=total, unit="img", desc="captions", file=sys.stderr, disable=not progress)
    try:
        while batch := index.uncaptioned(limit=batch_size, after=after):
            after = int(batch[-1]["id"])  # skipped (unreadable) rows stay uncaptioned: move past them
            ids, images = [], []
            for row in batch:
                try:
                    images.append(load_picture(row, max_pixels))
                    ids.append(int(row["id"]))
                except (ImageDecodeError, VideoDecodeError, OSError) as exc:
                    reason = getattr(exc, "reason", "unreadable")
                    logger.warning("not captioning %s: %s (%s)", row["path"], exc, reason)
                    skipped.append((str(row["path"]), str(reason), str(exc)))
            if images:
                texts = encoder.caption(images, prompt=prompt, **generate_kwargs)
                done += index.set_captions({i: str(t) for i, t in zip(ids, texts, strict=True)})
            bar.update(len(batch))
    finally:
        bar.close()
    return done, skipped
