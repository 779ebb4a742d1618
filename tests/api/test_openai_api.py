"""The OpenAI dialect against the real server, with the official ``openai`` client and the golden fixtures:
answers equal ChatModel.chat token for token, usage is right, embeddings equal the encoder's, errors are
the client's typed exceptions, and the server pushes back under overload."""

from __future__ import annotations

import base64
import concurrent.futures
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from api_helpers import FakeEncoder, serve
from conftest import CG_FIXTURE, CHAT_FIXTURE
from PIL import Image

from api.app import create_app
from api.settings import Settings

IMAGES = CHAT_FIXTURE / "images"
KEY = "oa-key-1"
PROMPTS = json.loads((CHAT_FIXTURE / "prompts.json").read_text())
CASES = {c["name"]: c for c in PROMPTS["cases"]}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(IMAGES / f"{name}.png")}}


@pytest.fixture(scope="module")
def oa_url(real_index_dir: Path, real_encoder, chat_model):  # noqa: ANN001
    settings = Settings(
        index=str(real_index_dir), model=str(CG_FIXTURE), chat_model=str(CHAT_FIXTURE), api_key=KEY,
        max_pixels=1_000_000, reload_interval_s=0, max_body_bytes=2_000_000,
    )  # fmt: skip
    with serve(create_app(settings, encoder=real_encoder, chat_model=chat_model)) as base:
        yield base


@pytest.fixture(scope="module")
def client(oa_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{oa_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _open(name: str) -> Image.Image:
    return Image.open(IMAGES / f"{name}.png").convert("RGB")


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str, list]:  # noqa: ANN003
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_list_chat_first(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["internvl_chat_tiny", "internvl_cg_tiny"]


def test_single_image_equals_chat(client: openai.OpenAI, chat_model) -> None:  # noqa: ANN001
    case = CASES["single_image"]
    question = case["question"]
    expected = chat_model.chat(question, images=[_open("wide")], max_new_tokens=8)
    messages = [{"role": "user", "content": [image_part("wide"), {"type": "text", "text": question}]}]
    out = client.chat.completions.create(
        model="internvl_chat_tiny", messages=messages, max_tokens=8, temperature=0
    )
    assert out.choices[0].message.content == expected == case["response"]
    assert out.choices[0].finish_reason == "length"  # 8 tokens, no separator (fixture table)
    assert out.usage.prompt_tokens == len(chat_model.encode([case["query"]])["input_ids"][0])
    assert out.usage.prompt_tokens == 113 and out.usage.completion_tokens == 8
    assert out.usage.total_tokens == 121
    text, chunks = _streamed(client, model="internvl_chat_tiny", messages=messages, max_tokens=8)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 113
    assert chunks[-1].usage.completion_tokens == 8


def test_two_images_equals_chat(client: openai.OpenAI, chat_model) -> None:  # noqa: ANN001
    text = "What are the similarities and differences between these two images?"
    expected = chat_model.chat(text, images=[_open("tall"), _open("rgba")], max_new_tokens=8)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": text}, image_part("tall"), image_part("rgba")]}
    ]
    out = client.chat.completions.create(model="internvl_chat_tiny", messages=messages, max_tokens=8)
    assert out.choices[0].message.content == expected == CASES["two_images"]["response"]
    assert out.usage.prompt_tokens == 152
    assert _streamed(client, model="internvl_chat_tiny", messages=messages, max_tokens=8)[0] == expected


def test_multi_turn_with_earlier_image_equals_chat(client: openai.OpenAI, chat_model) -> None:  # noqa: ANN001
    first, second = CASES["image_multi_turn_1"], CASES["image_multi_turn_2"]
    img = _open("rgba")
    answer1, history = chat_model.chat(first["question"], images=[img], max_new_tokens=8, return_history=True)
    assert answer1 == first["response"]
    expected = chat_model.chat(second["question"], images=[img], history=history, max_new_tokens=8)
    messages = [
        {
            "role": "user",
            "content": [image_part("rgba"), {"type": "text", "text": "Please describe the image in detail."}],
        },
        {"role": "assistant", "content": answer1},
        {"role": "user", "content": second["question"]},
    ]
    out = client.chat.completions.create(model="internvl_chat_tiny", messages=messages, max_tokens=8)
    assert out.choices[0].message.content == expected == second["response"]
    assert out.usage.prompt_tokens == 137
    assert _streamed(client, model="internvl_chat_tiny", messages=messages, max_tokens=8)[0] == expected


def test_system_message_and_stop(client: openai.OpenAI, chat_model) -> None:  # noqa: ANN001
    expected = chat_model.chat("Hello, who are you?", max_new_tokens=8, system_message="You are terse.")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello, who are you?"},
    ]
    out = client.chat.completions.create(model="internvl_chat_tiny", messages=messages, max_tokens=8)
    assert out.choices[0].message.content == expected
    stop = expected[3:5]
    cut = client.chat.completions.create(
        model="internvl_chat_tiny", messages=messages, max_tokens=8, stop=[stop]
    )
    assert cut.choices[0].message.content == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert (
        _streamed(client, model="internvl_chat_tiny", messages=messages, max_tokens=8, stop=stop)[0]
        == (expected[: expected.index(stop)])
    )


def test_seed_card_snippet_with_data_url(client: openai.OpenAI) -> None:
    model_name = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model_name,
        messages=[{
            "role": "user",
            "content": [
                {"type": "text", "text": "describe this image"},
                {"type": "image_url", "image_url": {"url": data_url(IMAGES / "wide.png")}},
            ],
        }],
        temperature=0.8,
        top_p=0.8,
        max_tokens=8,
        seed=3,
    )  # fmt: skip
    assert isinstance(response.choices[0].message.content, str)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_retrieval_extension_returns_sources(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="internvl_chat_tiny", messages=[{"role": "user", "content": "a wide picture"}], max_tokens=4,
        extra_body={"retrieval": {"k": 2}},
    )  # fmt: skip
    sources = out.model_extra["sources"]
    assert len(sources) == 2 and {"id", "path", "score"} <= set(sources[0])


def test_embeddings_equal_encoder(client: openai.OpenAI, real_encoder) -> None:  # noqa: ANN001
    texts = ["a photo of a cat", "a wide image"]
    out = client.embeddings.create(model="internvl_cg_tiny", input=texts)  # the client asks for base64
    raw = httpx.post(
        str(client.base_url) + "embeddings", json={"model": "internvl_cg_tiny", "input": texts},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()  # fmt: skip
    np.testing.assert_array_equal(
        np.array([d["embedding"] for d in raw["data"]], np.float32), real_encoder.encode_texts(texts)
    )
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    np.testing.assert_array_equal(got, real_encoder.encode_texts(texts))
    one = client.embeddings.create(
        model="internvl_cg_tiny", input="a photo of a cat", encoding_format="base64"
    )
    assert isinstance(one.data[0].embedding, str)  # asked for explicitly, the client leaves base64 as is
    vec = np.frombuffer(base64.b64decode(one.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(vec, real_encoder.encode_texts(["a photo of a cat"])[0], atol=1e-6)
    paths = [IMAGES / "wide.png", IMAGES / "rgba.png"]
    imgs = client.embeddings.create(
        model="internvl_cg_tiny", input=[data_url(p) for p in paths], extra_body={"modality": "image"}
    )
    got = np.array([d.embedding for d in imgs.data], dtype=np.float32)
    from retrieval.images import open_image

    np.testing.assert_array_equal(got, real_encoder.encode_images([open_image(p) for p in paths]))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_typed_errors(client: openai.OpenAI, oa_url: str) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        bad = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()},
        }
        client.chat.completions.create(
            model="internvl_chat_tiny", messages=[{"role": "user", "content": [bad]}]
        )
    with pytest.raises(openai.BadRequestError) as err:
        web = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        client.chat.completions.create(
            model="internvl_chat_tiny", messages=[{"role": "user", "content": [web]}]
        )
    assert err.value.body["code"] == "url_not_allowed"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="internvl_chat_tiny", messages=msgs, n=2)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="internvl_cg_tiny", input="x", dimensions=7)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{oa_url}/v1", api_key="wrong", max_retries=0).models.list()
    huge = "data:image/png;base64," + "A" * 3_000_000
    with pytest.raises(openai.APIStatusError) as err:
        client.embeddings.create(model="internvl_cg_tiny", input=huge, extra_body={"modality": "image"})
    assert err.value.status_code == 413 and "too large" in err.value.body["message"]
    # the other routes keep their own error format
    r = httpx.post(f"{oa_url}/search", json={"text": "x"})
    assert r.status_code == 401 and "detail" in r.json()


def test_overload_answers_429_and_recovers() -> None:
    encoder = FakeEncoder(delay_s=0.05)
    settings = Settings(model="fake", max_queued_encodes=2, reload_interval_s=0, batching=False)
    with serve(create_app(settings, encoder=encoder)) as base:
        body = {"model": "fake", "input": ["a", "b"]}

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/embeddings", json=body, timeout=30)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(post, range(48)))
        codes = [r.status_code for r in answers]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        for _ in range(3):  # recovered as soon as the flood stops
            assert post(0).status_code == 200
