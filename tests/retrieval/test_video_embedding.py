"""retrieval.video: frame-averaged video embeddings (the InternVL paper's 8-frame protocol) and segments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chat.video import VideoDecodeError, VideoReader, frame_indices, probe_video
from retrieval.video import VIDEO_EMBED_FRAMES, embed_video, segment_bounds

ROOT = Path(__file__).resolve().parents[2]
CLIP = ROOT / "tests" / "fixtures" / "internvl_chat_qwen2_tiny" / "video" / "clip_h264.mp4"
TINY_MODEL = ROOT / "tests" / "fixtures" / "internvl_cg_tiny"


@pytest.fixture(scope="module")
def encoder():
    from retrieval import load_encoder

    return load_encoder(TINY_MODEL, device="cpu")


def _expected(encoder, indices: list[int]) -> np.ndarray:
    with VideoReader(CLIP) as reader:
        frames = [Image.fromarray(f) for f in reader.get_batch(indices)]
    mean = encoder.encode_images(frames).mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_segment_bounds() -> None:
    assert segment_bounds(2.4, 1.0) == [(0.0, 1.0), (1.0, 2.0), (2.0, 2.4)]
    assert segment_bounds(2.0, 1.0) == [(0.0, 1.0), (1.0, 2.0)]
    with pytest.raises(ValueError):
        segment_bounds(2.0, 0)


def test_video_vector_is_the_normalised_mean_of_8_uniform_frames(encoder) -> None:
    info = probe_video(CLIP)
    out = embed_video(encoder, CLIP, segment_seconds=1.0, batch_size=5)
    whole = frame_indices(None, info.fps, info.max_frame, num_segments=VIDEO_EMBED_FRAMES)
    assert out.frame_indices == whole
    np.testing.assert_allclose(out.vector, _expected(encoder, whole), atol=1e-5)
    assert abs(float(np.linalg.norm(out.vector)) - 1.0) < 1e-5
    assert [(s.t_start, s.t_end) for s in out.segments] == segment_bounds(info.duration, 1.0)
    for seg in out.segments:
        assert all(round(seg.t_start * info.fps) <= i <= min(round(seg.t_end * info.fps), info.max_frame)
                   for i in seg.frame_indices)  # fmt: skip
        np.testing.assert_allclose(seg.vector, _expected(encoder, seg.frame_indices), atol=1e-5)
    assert embed_video(encoder, CLIP).segments == []


def test_over_long_video_is_refused(encoder) -> None:
    with pytest.raises(VideoDecodeError) as err:
        embed_video(encoder, CLIP, max_duration=1.0)
    assert err.value.reason == "too_long"
