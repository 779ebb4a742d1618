"""``POST /chat`` with a ``video`` against the golden video fixture (the model cards' decord path): the
answers of ``ChatModel.chat(video=...)`` and of the reference, over HTTP; bad videos and limits are 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from api_helpers import FakeEncoder, b64, serve

from api.app import create_app
from api.settings import Settings
from chat.video import video_prefix

QWEN2 = Path(__file__).resolve().parents[1] / "fixtures" / "internvl_chat_qwen2_tiny"
VIDEO_DIR = QWEN2 / "video"
META = json.loads((VIDEO_DIR / "video.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in META["cases"]}
CHAT_CASES = [name for name, case in CASES.items() if "chat" in case and case["bound"] is None]


@pytest.fixture(scope="module")
def chat_model():  # noqa: ANN201
    from chat import load_chat_model

    return load_chat_model(QWEN2, device="cpu", dtype=torch.float32)


def _server(tmp_path_factory: pytest.TempPathFactory, chat_model, **limits: object) -> Iterator[str]:  # noqa: ANN001
    from index import Index

    encoder = FakeEncoder()
    index_dir = tmp_path_factory.mktemp("empty_index")
    Index.create(index_dir, encoder.embed_dim, model=encoder.name, mode=encoder.mode).save()
    settings = Settings(index=str(index_dir), reload_interval_s=0, **limits)
    with serve(create_app(settings, encoder=encoder, chat_model=chat_model)) as base:
        yield base


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, chat_model) -> Iterator[str]:  # noqa: ANN001
    yield from _server(tmp_path_factory, chat_model)


def _video(case: dict) -> bytes:
    return (VIDEO_DIR / case["video"]).read_bytes()


def _first_question(case: dict) -> str:
    question = case["chat"]["turns"][0]["question"]
    prefix = video_prefix(case["num_segments"])
    assert question.startswith(prefix)
    return question[len(prefix) :]


def _body(case: dict, question: str, **extra: object) -> dict:
    max_new = case["chat"]["generation_config"]["max_new_tokens"]
    return {"question": question, "video": b64(_video(case)), "num_segments": case["num_segments"],
            "max_num_tiles": case["max_num"], "max_new_tokens": max_new, **extra}  # fmt: skip


def _sse_text(body: str) -> str:
    events = [e for e in body.split("\n\n") if e.strip()]
    assert events[-1].startswith("event: sources"), events[-1]
    return "".join(json.loads(e.removeprefix("data: "))["text"] for e in events[:-1])


@pytest.mark.parametrize("name", CHAT_CASES)
def test_chat_with_a_video_answers_as_chat_model_and_reference(url: str, chat_model, name: str) -> None:  # noqa: ANN001
    case = CASES[name]
    first, follow_up = case["chat"]["turns"]
    max_new = case["chat"]["generation_config"]["max_new_tokens"]
    direct = chat_model.chat(_first_question(case), video=VIDEO_DIR / case["video"], max_new_tokens=max_new,
                             num_segments=case["num_segments"], max_num_tiles=case["max_num"])  # fmt: skip
    assert direct == first["response"]
    r = httpx.post(url + "/chat", json=_body(case, _first_question(case)), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": direct, "sources": []}
    # the follow-up: with the history ChatModel returned (prefixed) and with the plain question; /chat's
    # history takes non-empty texts only, so a first answer that is legitimately empty cannot be sent back
    for user in (first["question"], _first_question(case)) if first["response"] else ():
        body = _body(case, follow_up["question"], history=[[user, first["response"]]])
        r = httpx.post(url + "/chat", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == follow_up["response"], user
    r = httpx.post(url + "/chat", json=_body(case, _first_question(case), stream=True), timeout=120)
    assert r.status_code == 200, r.text
    assert _sse_text(r.text) == first["response"]


#: VideoDecodeError's reasons
REASONS = {"empty", "unreadable", "undecodable", "no_video", "unsupported_codec", "truncated", "too_large"}


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_bad_videos_are_422_with_the_reason(url: str, kind: str) -> None:
    case = CASES[CHAT_CASES[0]]
    data = _video(case)
    data = b"not a video at all, just some bytes" * 4 if kind == "garbage" else data[: len(data) // 2]
    r = httpx.post(url + "/chat", json={**_body(case, "what happens?"), "video": b64(data)}, timeout=120)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["reason"] in REASONS, detail
    assert detail["message"].startswith("cannot decode the video"), detail


def test_video_request_validation(url: str) -> None:
    case = CASES[CHAT_CASES[0]]
    for extra in ({"num_segments": 0}, {"num_segments": 65}, {"images": [b64(b"x")]}, {"video": "%%%"}):
        r = httpx.post(url + "/chat", json={**_body(case, "what happens?"), **extra}, timeout=60)
        assert r.status_code == 422, (extra, r.text)


def _limits(kind: str, video: dict, size: int) -> tuple[dict, int, str]:
    """Settings just below the fixture video's size / frame count / duration, the status and a word of
    the message."""
    duration = video["decord_len"] / video["decord_avg_fps"]
    return {
        "bytes": ({"max_video_bytes": size - 1}, 413, "bytes"),
        "frames": ({"max_video_frames": video["decord_len"] - 1}, 422, "frames"),
        "duration": ({"max_video_duration_s": duration * 0.9}, 422, "long"),
    }[kind]


@pytest.mark.parametrize("kind", ["bytes", "frames", "duration"])
def test_video_limits_are_4xx(tmp_path_factory: pytest.TempPathFactory, chat_model, kind: str) -> None:  # noqa: ANN001
    case = CASES[CHAT_CASES[0]]
    video = next(v for v in META["videos"] if v["file"] == case["video"])
    limits, status, word = _limits(kind, video, len(_video(case)))
    for base in _server(tmp_path_factory, chat_model, **limits):
        r = httpx.post(base + "/chat", json=_body(case, "what happens?"), timeout=60)
        assert r.status_code == status, r.text
        assert word in r.json()["detail"], r.text


def _form(case: dict, question: str, **extra: object) -> dict[str, str]:
    body = _body(case, question, **extra)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items() if k != "video"}


@pytest.mark.parametrize("name", CHAT_CASES)
def test_multipart_video_upload_answers_as_json(url: str, name: str) -> None:
    case = CASES[name]
    first = case["chat"]["turns"][0]
    files = {"video": (case["video"], _video(case), "video/mp4")}
    r = httpx.post(url + "/chat", data=_form(case, _first_question(case)), files=files, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": first["response"], "sources": []}
    r = httpx.post(
        url + "/chat", data=_form(case, _first_question(case), stream=True), files=files, timeout=120
    )
    assert r.status_code == 200, r.text
    assert _sse_text(r.text) == first["response"]


def test_multipart_validation(url: str) -> None:
    case = CASES[CHAT_CASES[0]]
    files = {"video": ("v.mp4", _video(case), "video/mp4")}
    bad_forms = [
        ({"question": "what?"}, None),  # no video
        ({"question": "what?", "k": "3"}, files),  # not a multipart field
        ({"question": "what?", "num_segments": "65"}, files),
        ({"question": "what?", "stream": "maybe"}, files),
        ({"question": "what?"}, {"video": ("v.mp4", b"not a video" * 8, "video/mp4")}),
    ]
    for data, upload in bad_forms:
        r = httpx.post(url + "/chat", data=data, files=upload, timeout=60)
        assert r.status_code == 422, (data, r.text)
    r = httpx.post(url + "/chat", content=b"question", headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 415, r.text
