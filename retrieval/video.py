"""Video embeddings for retrieval: the L2-normalised mean of the embeddings of uniformly sampled frames.

The InternVL paper's zero-shot video protocol embeds 8 uniformly sampled frames with the image encoder and
averages them. Frames are sampled with the model cards' ``get_index`` (:func:`chat.video.frame_indices`):
the middle frame of each of ``num_frames`` equal parts of the video, or of a ``[t_start, t_end)`` segment.
All frames of a video and of its segments are decoded in one forward pass (seeking between them) and
encoded in batches as they come; only embeddings are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from chat.video import VideoDecodeError, VideoInfo, VideoReader, VideoSource, frame_indices
from retrieval.base import Encoder
from retrieval.images import DEFAULT_MAX_PIXELS

#: frames per video (and per segment) in the InternVL paper's zero-shot video protocol
VIDEO_EMBED_FRAMES = 8


@dataclass(frozen=True)
class VideoSegment:
    """One ``[t_start, t_end)`` stretch of a video (seconds) and its embedding."""

    t_start: float
    t_end: float
    frame_indices: list[int]
    vector: np.ndarray


@dataclass(frozen=True)
class VideoEmbedding:
    """A whole video's embedding, its sampled frames, and its segments' (when asked for)."""

    vector: np.ndarray
    frame_indices: list[int]
    info: VideoInfo
    segments: list[VideoSegment] = field(default_factory=list)


def segment_bounds(duration: float, seconds: float) -> list[tuple[float, float]]:
    """``[0, S), [S, 2S), ...`` up to ``duration``; the last segment ends at ``duration``."""
    if not seconds > 0:
        raise ValueError(f"segment length must be > 0 seconds, got {seconds}")
    bounds = []
    start = 0.0
    k = 0
    while start < duration:
        end = min((k + 1) * seconds, duration)
        bounds.append((start, end))
        k += 1
        start = k * seconds
    return bounds


def _segment_indices(info: VideoInfo, bound: tuple[float, float], num_frames: int) -> list[int] | None:
    """Sampled frames of one segment, or None when the segment holds no frame."""
    first = round(bound[0] * info.fps)
    if first > info.max_frame:
        return None
    indices = frame_indices(bound, info.fps, info.max_frame, num_segments=num_frames)
    last = max(first, min(round(bound[1] * info.fps), info.max_frame))
    return [min(max(i, first), last) for i in indices]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / max(float(np.linalg.norm(x)), 1e-12)


def embed_video(
    encoder: Encoder,
    source: VideoSource,
    *,
    num_frames: int = VIDEO_EMBED_FRAMES,
    segment_seconds: float | None = None,
    max_duration: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_size: int = 32,
) -> VideoEmbedding:
    """Embed a video (and, with ``segment_seconds``, each of its segments) with an image ``encoder``.

    Raises :class:`chat.video.VideoDecodeError` on bad input (reason ``too_long`` past ``max_duration``
    seconds).
    """
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    with VideoReader(source, max_pixels=max_pixels) as reader:
        info = reader.info
        if max_duration is not None and info.duration > max_duration:
            raise VideoDecodeError(
                f"{reader.label}: video lasts {info.duration:.1f} s, over the limit of {max_duration:g} s",
                reason="too_long",
            )
        whole = frame_indices(None, info.fps, info.max_frame, num_segments=int(num_frames))
        groups: list[tuple[tuple[float, float], list[int]]] = []
        if segment_seconds is not None:
            for bound in segment_bounds(info.duration, float(segment_seconds)):
                indices = _segment_indices(info, bound, int(num_frames))
                if indices is not None:
                    groups.append((bound, indices))
        wanted = sorted({*whole, *(i for _, idx in groups for i in idx)})
        embeddings: dict[int, np.ndarray] = {}
        batch: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            vectors = encoder.encode_pixels(torch.stack([pixels for _, pixels in batch]))
            embeddings.update({index: vectors[j] for j, (index, _) in enumerate(batch)})
            batch.clear()

        for index, frame in reader.frames(wanted):
            batch.append((index, encoder.preprocess(Image.fromarray(frame).convert("RGB"))))
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()

    def mean(indices: Sequence[int]) -> np.ndarray:
        return _normalize(np.mean([embeddings[i] for i in indices], axis=0))

    segments = [VideoSegment(b[0], b[1], idx, mean(idx)) for b, idx in groups]
    return VideoEmbedding(vector=mean(whole), frame_indices=whole, info=info, segments=segments)
