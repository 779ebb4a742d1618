"""``POST /chat`` with the InternVL-Chat-V1-2-Plus-style fixture: the official answers over HTTP.

The checkpoint's ``system_message`` ("Answer the questions.") and its one-tile-per-image preprocessing apply
to answers about uploaded images, with history, streamed, and to grounded answers (here over an empty
index, which answers without images: the fixture's text-only case).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from api_helpers import FakeEncoder, b64, serve

from api.app import create_app
from api.settings import Settings

V12 = Path(__file__).resolve().parents[1] / "fixtures" / "internvl_chat_v12plus_tiny"


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    prompts = json.loads((V12 / "prompts.json").read_text(encoding="utf-8"))
    return {case["name"]: case for case in prompts["cases"]}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):
    from chat import load_chat_model
    from index import Index

    encoder = FakeEncoder()
    index_dir = tmp_path_factory.mktemp("empty_index")
    Index.create(index_dir, encoder.embed_dim, model=encoder.name, mode=encoder.mode).save()
    chat_model = load_chat_model(V12, device="cpu")
    settings = Settings(index=str(index_dir), reload_interval_s=0)
    with serve(create_app(settings, encoder=encoder, chat_model=chat_model)) as base:
        yield base


def _body(case: dict, **extra: object) -> dict:
    body: dict = {"question": case["question"], "max_new_tokens": 8, "max_num_tiles": 12, **extra}
    if case["images"]:
        body["images"] = [b64((V12 / "images" / name).read_bytes()) for name in case["images"]]
    if case["history_in"]:
        body["history"] = case["history_in"][:-1]  # the reference appended the new turn to its list
    return body


@pytest.mark.parametrize("name", ["single_image", "follow_up", "two_images"])
def test_chat_with_images_answers_as_the_reference(url: str, cases: dict, name: str) -> None:
    r = httpx.post(url + "/chat", json=_body(cases[name]), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": cases[name]["response"], "sources": []}


def test_streamed_answer_is_the_reference(url: str, cases: dict) -> None:
    r = httpx.post(url + "/chat", json=_body(cases["two_images"], stream=True), timeout=120)
    assert r.status_code == 200, r.text
    pieces = [json.loads(line[len("data: "):])["text"] for line in r.text.splitlines()
              if line.startswith('data: {"text"')]  # fmt: skip
    assert "".join(pieces) == cases["two_images"]["response"]


def test_grounded_answer_without_indexed_images_is_the_text_only_reference(url: str, cases: dict) -> None:
    r = httpx.post(url + "/chat", json=_body(cases["text_only"]), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": cases["text_only"]["response"], "sources": []}
