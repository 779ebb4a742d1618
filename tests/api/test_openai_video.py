"""``/v1/chat/completions`` with vLLM's ``video_url`` parts, through the official ``openai`` client against
the real server and the golden video fixture: answers equal ``ChatModel.chat(video=...)`` (and the
reference) at temperature 0, streamed and not, over two turns; bad videos and /chat's limits are typed 4xx
errors."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from api_helpers import FakeEncoder, serve

from api.app import create_app
from api.settings import Settings
from chat.video import video_prefix

QWEN2 = Path(__file__).resolve().parents[1] / "fixtures" / "internvl_chat_qwen2_tiny"
VIDEO_DIR = QWEN2 / "video"
META = json.loads((VIDEO_DIR / "video.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in META["cases"]}
CHAT_CASES = [name for name, case in CASES.items() if "chat" in case and case["bound"] is None]
MODEL = "internvl_chat_qwen2_tiny"


@pytest.fixture(scope="module")
def chat_model():  # noqa: ANN201
    from chat import load_chat_model

    return load_chat_model(QWEN2, device="cpu", dtype=torch.float32)


def _server(
    tmp_path_factory: pytest.TempPathFactory, chat_model, **limits: object
) -> Iterator[openai.OpenAI]:  # noqa: ANN001
    from index import Index

    encoder = FakeEncoder()
    index_dir = tmp_path_factory.mktemp("empty_index")
    Index.create(index_dir, encoder.embed_dim, model=encoder.name, mode=encoder.mode).save()
    settings = Settings(index=str(index_dir), chat_model=str(QWEN2), reload_interval_s=0, **limits)
    with serve(create_app(settings, encoder=encoder, chat_model=chat_model)) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, chat_model) -> Iterator[openai.OpenAI]:  # noqa: ANN001
    yield from _server(tmp_path_factory, chat_model)


def _data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def _video_part(case: dict, data: bytes | None = None) -> dict:
    raw = (VIDEO_DIR / case["video"]).read_bytes() if data is None else data
    return {"type": "video_url", "video_url": {"url": _data_url(raw), "num_segments": case["num_segments"],
                                                "max_dynamic_patch": case["max_num"]}}  # fmt: skip


def _first_question(case: dict) -> str:
    question = case["chat"]["turns"][0]["question"]
    prefix = video_prefix(case["num_segments"])
    assert question.startswith(prefix)
    return question[len(prefix) :]


def _ask(client: openai.OpenAI, case: dict, messages: list[dict], **extra: object) -> object:
    max_new = case["chat"]["generation_config"]["max_new_tokens"]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_new, temperature=0,
                                          **extra)  # fmt: skip


def _first_messages(case: dict) -> list[dict]:
    return [{"role": "user", "content": [_video_part(case), {"type": "text", "text": _first_question(case)}]}]


@pytest.mark.parametrize("name", CHAT_CASES)
def test_video_url_answers_as_chat_model_and_reference(client: openai.OpenAI, chat_model, name: str) -> None:  # noqa: ANN001
    case = CASES[name]
    first, follow_up = case["chat"]["turns"]
    max_new = case["chat"]["generation_config"]["max_new_tokens"]
    direct = chat_model.chat(_first_question(case), video=VIDEO_DIR / case["video"], max_new_tokens=max_new,
                             num_segments=case["num_segments"], max_num_tiles=case["max_num"])  # fmt: skip
    assert direct == first["response"]
    out = _ask(client, case, _first_messages(case))
    assert out.choices[0].message.content == direct
    assert out.usage.prompt_tokens > case["num_segments"]  # every frame's image tokens are in the prompt
    stream = _ask(client, case, _first_messages(case), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == direct
    # the follow-up: the video stays in the first user turn, as ChatModel keeps its tiles
    messages = [*_first_messages(case), {"role": "assistant", "content": first["response"]},
                {"role": "user", "content": follow_up["question"]}]  # fmt: skip
    assert _ask(client, case, messages).choices[0].message.content == follow_up["response"]


def test_bad_videos_are_typed_errors(client: openai.OpenAI) -> None:
    case = CASES[CHAT_CASES[0]]
    data = (VIDEO_DIR / case["video"]).read_bytes()
    for bad in (b"not a video at all, just some bytes" * 4, data[: len(data) // 2]):
        messages = [{"role": "user", "content": [_video_part(case, bad), {"type": "text", "text": "what?"}]}]
        with pytest.raises(openai.UnprocessableEntityError) as err:
            _ask(client, case, messages)
        assert "cannot decode the video" in str(err.value)
        assert err.value.body["code"] == "invalid_video"
        assert err.value.body["param"] == "messages.0.content.0.video_url"
    part = _video_part(case)
    bad_urls = [
        {**part["video_url"], "url": "https://example.com/a.mp4"},
        {**part["video_url"], "num_segments": 0},
        {**part["video_url"], "num_segments": 65},
    ]
    for video_url in bad_urls:
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": video_url}]}]
        with pytest.raises(openai.BadRequestError):
            _ask(client, case, messages)


@pytest.mark.parametrize("kind", ["bytes", "frames", "duration"])
def test_video_limits_are_4xx(tmp_path_factory: pytest.TempPathFactory, chat_model, kind: str) -> None:  # noqa: ANN001
    case = CASES[CHAT_CASES[0]]
    video = next(v for v in META["videos"] if v["file"] == case["video"])
    size = len((VIDEO_DIR / case["video"]).read_bytes())
    duration = video["decord_len"] / video["decord_avg_fps"]
    limits, error, word = {
        "bytes": ({"max_video_bytes": size - 1}, openai.APIStatusError, "bytes"),
        "frames": ({"max_video_frames": video["decord_len"] - 1}, openai.UnprocessableEntityError, "frames"),
        "duration": ({"max_video_duration_s": duration * 0.9}, openai.UnprocessableEntityError, "long"),
    }[kind]
    for client in _server(tmp_path_factory, chat_model, **limits):
        with pytest.raises(error) as err:
            _ask(client, case, _first_messages(case))
        assert err.value.status_code == (413 if kind == "bytes" else 422)
        assert word in err.value.body["message"]


def test_image_and_video_in_one_turn(client: openai.OpenAI, chat_model) -> None:  # noqa: ANN001
    """Mixed media: ``Image-1: <image>\\n`` for the image, then the video's ``FrameN`` placeholders."""
    import io

    from PIL import Image

    case = CASES[CHAT_CASES[0]]
    image = Image.new("RGB", (40, 30), (200, 30, 60))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": image_url}}, _video_part(case),
               {"type": "text", "text": "what is shown?"}]  # fmt: skip
    out = _ask(client, case, [{"role": "user", "content": content}])
    tiles, patches = chat_model.tile_images([image], None)
    frames, frame_patches = chat_model.load_video(
        VIDEO_DIR / case["video"], num_segments=case["num_segments"], max_num_tiles=case["max_num"]
    )
    question = "Image-1: <image>\n" + video_prefix(len(frame_patches)) + "what is shown?"
    direct = chat_model.chat(question, pixel_values=torch.cat([tiles, frames]),
                             num_patches_list=[*patches, *frame_patches],
                             max_new_tokens=case["chat"]["generation_config"]["max_new_tokens"])  # fmt: skip
    assert out.choices[0].message.content == direct
