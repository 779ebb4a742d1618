"""The InternVL-Chat model cards' video input: ``get_index`` frame sampling and ``load_video``, on PyAV.

The model cards read videos with decord; this module reproduces decord's conventions with PyAV:
the frame count is the number of the video stream's packets, frame ``i`` is the packet with the ``i``-th
smallest pts (presentation order), ``max_frame = frame count - 1`` and the fps is the stream's average
frame rate. Frames are fetched by seeking to the nearest keyframe before each sampled frame and decoding
forward to its exact pts, so a long file is never decoded (or held in memory) whole: only the sampled
frames are kept. Each frame is tiled with the model cards' ``dynamic_preprocess`` (thumbnail on) and
``build_transform``.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from chat.tiling import load_image_tiles
from chat.transforms import TileTransform
from retrieval.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import av.container

logger = logging.getLogger(__name__)

#: the model cards' ``load_video(input_size=448)``; :class:`chat.ChatModel` passes its checkpoint's size
DEFAULT_INPUT_SIZE = 448

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})

VideoSource = str | os.PathLike | bytes | bytearray | BinaryIO
Bound = Sequence[float] | None


class VideoDecodeError(ValueError):
    """The input is not a decodable video. ``reason`` is a short machine-readable tag: ``empty``,
    ``unreadable``, ``undecodable``, ``no_video`` (e.g. audio only), ``unsupported_codec``, ``truncated``,
    ``too_large``."""

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a declared dependency
        raise RuntimeError("video input needs PyAV: pip install av") from exc
    return av


def frame_indices(
    bound: Bound, fps: float, max_frame: int, first_idx: int = 0, num_segments: int = 32
) -> list[int]:
    """The model cards' ``get_index``: the middle frame of each of ``num_segments`` equal segments.

    ``bound`` is ``(start, end)`` in seconds or None (the whole video); ``max_frame`` is the last frame's
    index. Same arithmetic as the reference (Python's and numpy's round-half-to-even, ``int`` truncation).
    """
    if int(num_segments) < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(int(num_segments))]


@dataclass(frozen=True)
class VideoInfo:
    """Facts about a video's first video stream, as decord reports them."""

    frame_count: int  #: decord's ``len(vr)``: the stream's packets
    fps: float  #: decord's ``get_avg_fps()``: the stream's average frame rate
    width: int
    height: int
    codec: str

    @property
    def max_frame(self) -> int:
        """Index of the last frame (``len(vr) - 1``)."""
        return self.frame_count - 1

    @property
    def duration(self) -> float:
        """Seconds, ``frame_count / fps`` (0 when the fps is unknown)."""
        return self.frame_count / self.fps if self.fps > 0 else 0.0


def _label(source: VideoSource) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<video bytes>"


class VideoReader:
    """Frame-accurate random access to a video's frames by decord's frame index, decoding only what is
    needed. Use as a context manager; raises :class:`VideoDecodeError` on bad input."""

    def __init__(self, source: VideoSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self._av = _import_av()
        self.label = _label(source)
        self._container = self._open(source)
        try:
            self._init_stream(max_pixels)
        except BaseException:
            self._container.close()
            raise

    # ------------------------------------------------------------------ opening
    def _open(self, source: VideoSource) -> av.container.InputContainer:
        av = self._av
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise VideoDecodeError("empty video data (0 bytes)", reason="empty")
            target: Any = io.BytesIO(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            try:
                size = Path(source).stat().st_size
            except OSError as exc:
                raise VideoDecodeError(f"{self.label}: cannot read file: {exc}", reason="unreadable") from exc
            if size == 0:
                raise VideoDecodeError(f"{self.label}: empty file (0 bytes)", reason="empty")
            target = os.fspath(source)
        else:
            target = source
        try:
            return av.open(target, mode="r")
        except av.FFmpegError as exc:
            raise VideoDecodeError(f"{self.label}: not a readable video container ({exc})") from exc
        except OSError as exc:
            raise VideoDecodeError(f"{self.label}: cannot read video ({exc})", reason="unreadable") from exc

    def _init_stream(self, max_pixels: int | None) -> None:
        av = self._av
        if not self._container.streams.video:
            raise VideoDecodeError(f"{self.label}: no video stream", reason="no_video")
        stream = self._container.streams.video[0]
        self._stream = stream
        ctx = stream.codec_context
        if ctx is None:
            raise VideoDecodeError(
                f"{self.label}: no decoder for this video codec", reason="unsupported_codec"
            )
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if max_pixels is not None and width * height > max_pixels:
            raise VideoDecodeError(
                f"{self.label}: frames are {width}x{height} = {width * height} pixels, over the limit of "
                f"{max_pixels}",
                reason="too_large",
            )
        # decord's index: every packet of the stream, sorted by pts (its frame order), and the keyframes
        pts: list[int | None] = []
        key_pts: list[int] = []
        try:
            for packet in self._container.demux(stream):
                if packet.size == 0 and packet.pts is None:  # PyAV's end-of-stream flush packet
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe and packet.pts is not None:
                    key_pts.append(packet.pts)
        except av.FFmpegError as exc:
            raise VideoDecodeError(f"{self.label}: corrupt video data ({exc})", reason="truncated") from exc
        if not pts:
            raise VideoDecodeError(f"{self.label}: the video stream has no frames", reason="undecodable")
        known = [p for p in pts if p is not None]
        # without a pts per packet (or with repeated ones) frames are found by counting instead
        self._pts: list[int] | None = sorted(known) if len(set(known)) == len(pts) else None
        self._key_pts = sorted(key_pts)
        rate = stream.average_rate
        fps = float(rate.numerator) / float(rate.denominator) if rate and rate.denominator else 0.0
        self.info = VideoInfo(frame_count=len(pts), fps=fps, width=width, height=height, codec=str(ctx.name))
        self._decoder: Iterator[Any] | None = None
        self._last_pts: int | None = None
        self._last_frame: np.ndarray | None = None

    # ------------------------------------------------------------------ context manager
    def close(self) -> None:
        """Release the container."""
        self._decoder = None
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return self.info.frame_count

    # ------------------------------------------------------------------ decoding
    def _seek(self, pts: int) -> None:
        self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(self._stream)
        self._last_pts = None

    def _next_frame(self) -> Any | None:
        assert self._decoder is not None
        try:
            return next(self._decoder)
        except StopIteration:
            return None
        except self._av.FFmpegError as exc:
            raise VideoDecodeError(f"{self.label}: cannot decode video ({exc})") from exc

    def _keyframe_before(self, pts: int) -> int:
        i = bisect.bisect_right(self._key_pts, pts) - 1
        return self._key_pts[i] if i >= 0 else (self._pts[0] if self._pts else 0)

    def _frame_at_pts(self, index: int, target: int) -> np.ndarray:
        key = self._keyframe_before(target)
        if (
            self._decoder is None
            or self._last_pts is None
            or self._last_pts >= target
            or key > self._last_pts
        ):
            self._seek(key)
        seek_at = key
        previous: Any = None  # the last decoded frame before the target, since the last seek
        first = self._pts[0] if self._pts else 0
        while True:
            frame = self._next_frame()
            if frame is None:
                return self._substitute(index, "the stream ended before it", previous)
            if frame.pts is None:
                raise VideoDecodeError(f"{self.label}: decoded frame without a timestamp")
            if frame.pts == target:
                self._last_pts = int(frame.pts)
                self._last_frame = frame.to_ndarray(format="rgb24")
                return self._last_frame
            if frame.pts < target:
                self._last_pts, previous = int(frame.pts), frame
                continue
            if previous is not None or self._last_pts is not None or seek_at <= first:
                return self._substitute(index, "the decoder produced no frame for it", previous)
            # the seek landed past the frame: seek to the keyframe before, up to the start
            earlier = [k for k in self._key_pts if k < seek_at]
            seek_at = earlier[-1] if earlier else first
            self._seek(seek_at)

    def _substitute(self, index: int, why: str, previous: Any = None) -> np.ndarray:
        """decord's behaviour for undecodable frames: the previous decoded frame stands in."""
        if previous is not None:
            self._last_frame = previous.to_ndarray(format="rgb24")
        if self._last_frame is None:
            raise VideoDecodeError(f"{self.label}: frame {index} is missing: {why}", reason="truncated")
        logger.warning("%s: frame %d is missing (%s); using the previous frame", self.label, index, why)
        return self._last_frame

    def _frames_by_count(self, wanted: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        self._seek(0)
        targets = iter(wanted)
        want = next(targets, None)
        count = 0
        while want is not None:
            frame = self._next_frame()
            if frame is None:
                arr = self._substitute(want, "the stream ended before it")
                for w in [want, *targets]:
                    yield w, arr
                return
            if count == want:
                self._last_frame = frame.to_ndarray(format="rgb24")
                while want == count:
                    yield want, self._last_frame
                    want = next(targets, None)
            count += 1

    def frames(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, frame)`` for each distinct index in ascending order; frames are ``HxWx3`` uint8 RGB
        (PyAV's ``to_ndarray(format="rgb24")``, which equals decord's)."""
        wanted = sorted({int(i) for i in indices})
        if wanted and (wanted[0] < 0 or wanted[-1] >= self.info.frame_count):
            raise IndexError(f"frame indices must be in [0, {self.info.frame_count - 1}], got {wanted}")
        if self._pts is None:
            yield from self._frames_by_count(wanted)
            return
        for index in wanted:
            yield index, self._frame_at_pts(index, self._pts[index])

    def get_batch(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Frames at ``indices`` in the given order (repeats allowed), like decord's ``get_batch``."""
        got = dict(self.frames(indices))
        return [got[int(i)] for i in indices]


def probe_video(source: VideoSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Frame count, fps, size and codec of a video (demuxes it, decodes nothing)."""
    with VideoReader(source, max_pixels=max_pixels) as reader:
        return reader.info


def _check_bound(bound: Bound) -> None:
    if not bound:
        return
    if len(bound) != 2:
        raise ValueError(f"bound must be (start, end) in seconds, got {bound!r}")
    start, end = float(bound[0]), float(bound[1])
    if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
        raise ValueError(f"bound must be finite seconds with start < end, got {bound!r}")


def sample_frames(
    source: VideoSource,
    bound: Bound = None,
    num_segments: int = 32,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[list[int], list[np.ndarray], VideoInfo]:
    """The frames ``load_video`` tiles: ``(frame indices, HxWx3 uint8 frames, info)``."""
    _check_bound(bound)
    with VideoReader(source, max_pixels=max_pixels) as reader:
        info = reader.info
        indices = frame_indices(bound, info.fps, info.max_frame, first_idx=0, num_segments=num_segments)
        if indices[0] < 0 or indices[-1] > info.max_frame or (bound and indices[0] > indices[-1]):
            raise ValueError(
                f"bound {tuple(bound) if bound else None} selects no frames of this video "
                f"({info.frame_count} frames at {info.fps:g} fps)"
            )
        frames = reader.get_batch(indices)
    return indices, frames, info


def load_video(
    path: VideoSource,
    bound: Bound = None,
    input_size: int | None = None,
    max_num: int = 1,
    num_segments: int = 32,
    *,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, list[int]]:
    """The model cards' ``load_video``: ``(pixel_values (sum n_i, 3, S, S), num_patches_list [n_i])``.

    ``num_segments`` frames are sampled with :func:`frame_indices`; each is tiled by ``dynamic_preprocess``
    (``min_num=1``, ``max_num``, thumbnail on) into ``input_size`` tiles (default
    :data:`DEFAULT_INPUT_SIZE`) through ``transform`` (default: the model cards' ``build_transform``).
    ``path`` is a file path, bytes or a binary file. Raises :class:`VideoDecodeError` on bad input and
    ``ValueError`` on bad arguments.
    """
    size = DEFAULT_INPUT_SIZE if input_size is None else int(input_size)
    if int(max_num) < 1:
        raise ValueError(f"max_num must be >= 1, got {max_num}")
    transform = transform or TileTransform(size)
    _, frames, _ = sample_frames(path, bound, num_segments, max_pixels=max_pixels)
    tensors = [
        load_image_tiles(Image.fromarray(frame).convert("RGB"), image_size=size, max_num=int(max_num),
                         min_num=1, use_thumbnail=True, transform=transform)
        for frame in frames
    ]  # fmt: skip
    return torch.cat(tensors), [int(t.shape[0]) for t in tensors]


def video_prefix(num_frames: int) -> str:
    """The model cards' ``Frame1: <image>\\nFrame2: <image>\\n...`` question prefix."""
    return "".join(f"Frame{i + 1}: <image>\n" for i in range(int(num_frames)))
