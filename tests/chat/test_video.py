"""chat.video and ChatModel video chat against the golden video fixture (the model cards' decord path)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL
import pytest
import torch
from safetensors.torch import load_file

from chat.video import (
    VideoDecodeError,
    VideoReader,
    frame_indices,
    load_video,
    probe_video,
    sample_frames,
    video_prefix,
)
from tests.chat.conftest import FIXTURES, LOGIT_ATOL, LOGIT_RTOL, assert_close

VIDEO_DIR = FIXTURES / "internvl_chat_qwen2_tiny" / "video"
META = json.loads((VIDEO_DIR / "video.json").read_text(encoding="utf-8"))
VIDEOS = {v["file"]: v for v in META["videos"]}
CASES = {case["name"]: case for case in META["cases"]}
CHAT_CASES = [name for name, case in CASES.items() if "chat" in case]
# video README: the reference ran Pillow 10.2; Pillow >= 13 resizes some frames differently (up to 0.21)
PIXEL_ATOL = 0.25 if int(PIL.__version__.split(".")[0]) >= 13 else 0.0


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(VIDEO_DIR / "expected.safetensors")


@pytest.fixture(scope="module")
def qwen2(golden_qwen2):
    return golden_qwen2


def _path(case: dict) -> Path:
    return VIDEO_DIR / case["video"]


def _max_new(case: dict) -> int:
    return int(case["chat"]["generation_config"]["max_new_tokens"])


def _new_ids(qwen2, turn: dict) -> list[int]:
    """The turn's generated ids without transformers 4.37's generate() echo of the LLM's bos_token_id."""
    ids = list(turn["generated_ids"])
    bos = qwen2.model.model.config.text_config.bos_token_id
    assert ids[0] == bos, "the reference's inputs_embeds generate() starts with the LLM's bos"
    return ids[1:]


# ---------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", list(CASES))
def test_frame_indices_match_get_index(name: str) -> None:
    case = CASES[name]
    video = VIDEOS[case["video"]]
    got = frame_indices(case["bound"], video["decord_avg_fps"], video["decord_len"] - 1,
                        num_segments=case["num_segments"])  # fmt: skip
    assert got == case["frame_indices"]


def test_frame_indices_round_half_to_even() -> None:
    """bound 0.5 s at 25 fps is frame 12.5: the reference's round() gives 12 (half to even)."""
    assert frame_indices((0.5, 1.5), 25.0, 59, num_segments=4) == [15, 21, 28, 35]
    assert frame_indices(None, 25.0, 0, num_segments=3) == [0, 0, 0]  # one-frame video
    with pytest.raises(ValueError, match="num_segments"):
        frame_indices(None, 25.0, 59, num_segments=0)


@pytest.mark.parametrize("file", list(VIDEOS))
def test_reader_reports_decords_length_fps_and_frames(file: str, expected) -> None:
    video = VIDEOS[file]
    info = probe_video(VIDEO_DIR / file)
    assert info.frame_count == video["decord_len"]
    assert info.fps == video["decord_avg_fps"]
    assert [info.height, info.width, 3] == video["frame_shape"]
    ref = expected[f"video{META['videos'].index(video)}_frames_decord"]
    order = np.random.default_rng(0).permutation(info.frame_count).tolist()  # random access, not sequential
    with VideoReader(VIDEO_DIR / file) as reader:
        frames = reader.get_batch(order)
    worst = max(
        int((torch.from_numpy(f).int() - ref[i].int()).abs().max())
        for i, f in zip(order, frames, strict=True)
    )
    assert worst <= video["pyav_vs_decord_max_abs_uint8"]


@pytest.mark.parametrize("name", list(CASES))
def test_load_video_matches_reference(name: str, expected) -> None:
    case = CASES[name]
    indices, _, _ = sample_frames(_path(case), case["bound"], case["num_segments"])
    assert indices == case["frame_indices"]
    pixel_values, num_patches_list = load_video(
        _path(case), bound=case["bound"], input_size=case["input_size"], max_num=case["max_num"],
        num_segments=case["num_segments"],
    )  # fmt: skip
    assert num_patches_list == case["num_patches_list"]
    assert_close(pixel_values, expected[f"{name}_pixel_values"], PIXEL_ATOL, 0.0, f"{name} pixel_values")


def test_load_video_from_bytes_and_file_objects(expected) -> None:
    case = CASES[CHAT_CASES[0]]
    data = _path(case).read_bytes()
    kwargs = {
        "input_size": case["input_size"],
        "max_num": case["max_num"],
        "num_segments": case["num_segments"],
    }
    from_path, npl = load_video(_path(case), **kwargs)
    from_bytes, npl_b = load_video(data, **kwargs)
    with open(_path(case), "rb") as fh:
        from_file, npl_f = load_video(fh, **kwargs)
    assert npl == npl_b == npl_f
    assert torch.equal(from_path, from_bytes) and torch.equal(from_path, from_file)


def test_load_video_default_input_size_is_the_model_cards() -> None:
    pixel_values, npl = load_video(_path(CASES[CHAT_CASES[0]]), num_segments=2)
    assert tuple(pixel_values.shape) == (2, 3, 448, 448) and npl == [1, 1]


# ---------------------------------------------------------------------------------------- chat
@pytest.mark.parametrize("name", CHAT_CASES)
def test_video_chat_through_pixel_values(name: str, qwen2, expected) -> None:
    """The model card's two turns, with load_video's pixel_values + num_patches_list."""
    case, model = CASES[name], qwen2.model
    pixel_values, npl = load_video(_path(case), bound=case["bound"], input_size=model.settings.image_size,
                                   max_num=case["max_num"], num_segments=case["num_segments"])  # fmt: skip
    history = None
    for t, turn in enumerate(case["chat"]["turns"]):
        kwargs = {"pixel_values": pixel_values, "num_patches_list": npl, "history": history}
        query, _ = model.prepare(turn["question"], **kwargs)
        ids = model.generate_ids(
            [query], pixel_values, generation_config=model.generation_config(max_new_tokens=_max_new(case))
        )
        assert ids == [_new_ids(qwen2, turn)], (name, t)
        # the prompt with the reference's own pixel values: its prefill logits
        with torch.inference_mode():
            logits = model.model(
                input_ids=model.encode([query])["input_ids"], pixel_values=expected[f"{name}_pixel_values"]
            ).logits[0, -1]
        assert_close(logits, expected[f"{name}_turn{t}_prefill_last_logits"], LOGIT_ATOL, LOGIT_RTOL,
                     f"{name} turn{t} prefill logits")  # fmt: skip
        answer, history = model.chat(turn["question"], return_history=True, max_new_tokens=_max_new(case),
                                     **kwargs)  # fmt: skip
        assert answer == turn["response"], (name, t)
    assert [list(h) for h in history] == case["chat"]["history_out"]


@pytest.mark.parametrize("name", CHAT_CASES)
def test_video_chat_through_video_argument(name: str, qwen2) -> None:
    """``video=`` builds the FrameN prefix on the first turn and keeps the video's tiles for the next."""
    case, model = CASES[name], qwen2.model
    turns = case["chat"]["turns"]
    first, follow_up = turns[0], turns[1]
    prefix = video_prefix(case["num_segments"])
    assert first["question"].startswith(prefix)
    plain_question = first["question"][len(prefix) :]
    kwargs = {"video": _path(case), "num_segments": case["num_segments"], "max_num_tiles": case["max_num"],
              "bound": case["bound"], "max_new_tokens": _max_new(case)}  # fmt: skip
    answer, history = model.chat(plain_question, return_history=True, **kwargs)
    assert answer == first["response"]
    assert [list(h) for h in history] == case["chat"]["history_out"][:1]  # the prefixed question recorded
    answer2, history2 = model.chat(follow_up["question"], history=history, return_history=True, **kwargs)
    assert answer2 == follow_up["response"]
    assert [list(h) for h in history2] == case["chat"]["history_out"]
    streamed = "".join(model.stream(follow_up["question"], history=history, **kwargs))
    assert streamed == follow_up["response"]
    video_kwargs = {k: v for k, v in kwargs.items() if k != "max_new_tokens"}
    query, pixel_values = model.prepare(plain_question, **video_kwargs)
    assert query == model.prepare(first["question"], pixel_values=pixel_values,
                                  num_patches_list=case["num_patches_list"])[0]  # fmt: skip
    ids = model.generate_ids(
        [query], pixel_values, generation_config=model.generation_config(max_new_tokens=_max_new(case))
    )
    assert ids == [_new_ids(qwen2, first)]


def test_video_chat_argument_errors(qwen2) -> None:
    model, path = qwen2.model, _path(CASES[CHAT_CASES[0]])
    pixels, _ = model.load_video(path, num_segments=2)
    with pytest.raises(ValueError, match="not several"):
        model.chat("Hi", video=path, pixel_values=pixels, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_num_tiles"):
        model.chat("Hi", video=path, max_num_tiles=0, max_new_tokens=1)
    with pytest.raises(ValueError, match="num_segments"):
        model.chat("Hi", video=path, num_segments=0, max_new_tokens=1)
    with pytest.raises(ValueError, match="bound"):
        model.chat("Hi", video=path, bound=(2.0, 1.0), max_new_tokens=1)
    with pytest.raises(ValueError, match="selects no frames"):
        model.chat("Hi", video=path, bound=(100.0, 200.0), max_new_tokens=1)
    with pytest.raises(VideoDecodeError):
        model.chat("Hi", video=b"not a video at all", max_new_tokens=1)


# ---------------------------------------------------------------------------------------- decoding
def _encode(
    path: Path,
    n: int,
    *,
    codec: str = "libx264",
    gop: int = 6,
    bframes: int = 2,
    fps: int = 24,
    size: tuple[int, int] = (64, 48),
) -> list[np.ndarray]:
    """Write ``n`` distinct frames (a bar as long as the frame number); returns what PyAV decodes."""
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        for i in range(n):
            img = np.full((size[1], size[0], 3), 40, np.uint8)
            img[: size[1] // 2, : 1 + (i * (size[0] - 1)) // max(n - 1, 1)] = 230
            img[size[1] // 2 :, :, 0] = (i * 37) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as inp:
        return [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "libx264"), (".mkv", "libx264"), (".avi", "mpeg4")])
def test_seeking_is_frame_accurate_and_decodes_little(tmp_path: Path, monkeypatch, suffix, codec) -> None:
    path = tmp_path / f"gops{suffix}"
    frames = _encode(path, 48, codec=codec)
    decoded = 0
    original = VideoReader._next_frame

    def counting(self):
        nonlocal decoded
        decoded += 1
        return original(self)

    monkeypatch.setattr(VideoReader, "_next_frame", counting)
    with VideoReader(path) as reader:
        assert len(reader) == len(frames) == 48
        for index in (45, 3, 30, 31, 47, 0, 12):  # backwards and forwards, across GOPs
            decoded = 0
            (got,) = reader.get_batch([index])
            assert np.array_equal(got, frames[index]), index
            assert decoded <= 6 + 4, f"frame {index}: {decoded} frames decoded (GOP of 6)"
        order = [40, 7, 7, 22, 1]
        assert all(np.array_equal(a, frames[i]) for a, i in zip(reader.get_batch(order), order, strict=True))


def test_frames_by_counting_when_timestamps_are_unusable(tmp_path: Path) -> None:
    """Without one pts per packet the reader counts decoded frames from the start instead of seeking."""
    path = tmp_path / "count.mp4"
    frames = _encode(path, 20)
    with VideoReader(path) as reader:
        reader._pts = None
        order = [17, 2, 2, 9]
        assert all(np.array_equal(a, frames[i]) for a, i in zip(reader.get_batch(order), order, strict=True))
        with pytest.raises(IndexError):
            reader.get_batch([20])


def test_long_video_is_not_decoded_whole(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "long.mp4"
    _encode(path, 240, gop=12)
    decoded = 0
    original = VideoReader._next_frame

    def counting(self):
        nonlocal decoded
        decoded += 1
        return original(self)

    monkeypatch.setattr(VideoReader, "_next_frame", counting)
    pixel_values, npl = load_video(path, input_size=28, num_segments=4)
    assert npl == [1, 1, 1, 1] and pixel_values.shape[0] == 4
    assert decoded < 240 // 2


def _audio_only(path: Path) -> None:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_bad_videos_raise_clear_errors(tmp_path: Path) -> None:
    good = (VIDEO_DIR / CASES[CHAT_CASES[0]]["video"]).read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello, I am not a video\n")
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 3])
    _audio_only(tmp_path / "audio.m4a")
    cases = {
        "empty.mp4": "empty",
        "text.mp4": "undecodable",
        "truncated.mp4": None,
        "audio.m4a": "no_video",
        "missing.mp4": "unreadable",
    }
    for name, reason in cases.items():
        with pytest.raises(VideoDecodeError) as err:
            load_video(tmp_path / name, input_size=28, num_segments=2)
        assert name in str(err.value)
        if reason is not None:
            assert err.value.reason == reason, name
    with pytest.raises(VideoDecodeError) as err:
        load_video(b"", num_segments=2)
    assert err.value.reason == "empty"
    with pytest.raises(VideoDecodeError) as err:
        probe_video(VIDEO_DIR / CASES[CHAT_CASES[0]]["video"], max_pixels=100)
    assert err.value.reason == "too_large"
