"""The real stack over HTTP: tiny InternVL-C fixture encoder, tiny InternVL-Chat fixture, real index."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_helpers import b64

from retrieval.images import open_image
from retrieval.zero_shot import classify as zero_shot

FIXTURE_IMAGE = "img0_rgb_97x61.png"


@pytest.fixture(scope="module")
def client(real_url: str):
    with httpx.Client(base_url=real_url, timeout=120) as c:
        yield c


def _id_of(client: httpx.Client, name: str) -> int:
    rows = client.post("/search", json={"text": "anything", "k": 100}).json()["results"]
    return next(r["id"] for r in rows if r["path"].endswith(name))


def test_health_reports_the_real_models(client: httpx.Client) -> None:
    body = client.get("/health").json()
    assert body["ready"] and body["index_size"] == 9
    assert body["models"]["encoder"] == "internvl_cg_tiny:internvl-c" and body["models"]["embed_dim"] == 32
    assert body["models"]["chat"] is not None


def test_search_text_matches_direct_encoder(
    client: httpx.Client, real_encoder, real_image_root: Path
) -> None:  # noqa: ANN001
    r = client.post("/search", json={"text": "a photo of a cat", "k": 9})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    paths = sorted(p for p in real_image_root.iterdir() if p.is_file())
    q = real_encoder.encode_texts(["a photo of a cat"])[0]
    img = real_encoder.encode_images([open_image(p) for p in paths])
    expected = sorted(zip((img @ q).tolist(), map(str, paths), strict=True), reverse=True)
    assert [x["path"] for x in results] == [p for _, p in expected]
    # stored vectors are float16: scores agree to float16 precision
    np.testing.assert_allclose([x["score"] for x in results], [s for s, _ in expected], atol=2e-3)


def test_search_by_image_upload_and_id_find_itself(client: httpx.Client, real_image_root: Path) -> None:
    data = (real_image_root / FIXTURE_IMAGE).read_bytes()
    for kwargs in ({"json": {"image": b64(data), "k": 3}}, {"files": {"image": (FIXTURE_IMAGE, data)}}):
        r = client.post("/search", **kwargs)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["path"].endswith(FIXTURE_IMAGE)
        assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    image_id = _id_of(client, FIXTURE_IMAGE)
    top = client.post("/search", json={"image_id": image_id, "k": 2}).json()["results"][0]
    assert top["id"] == image_id


def test_classify_matches_zero_shot(client: httpx.Client, real_encoder, real_image_root: Path) -> None:  # noqa: ANN001
    labels = ["cat", "dog", "猫", "voiture"]
    data = (real_image_root / FIXTURE_IMAGE).read_bytes()
    r = client.post(
        "/classify", json={"image": b64(data), "labels": labels, "templates": ["a photo of a {}."]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    scores = [s["score"] for s in body["scores"]]
    assert scores == sorted(scores, reverse=True) and body["label"] == body["scores"][0]["label"]
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    expected = zero_shot(
        real_encoder, [open_image(real_image_root / FIXTURE_IMAGE)], labels, ["a photo of a {}."]
    )
    got = {s["label"]: s["score"] for s in body["scores"]}
    np.testing.assert_allclose([got[x] for x in labels], expected[0], atol=1e-4)

    by_id = client.post("/classify", json={"image_id": _id_of(client, FIXTURE_IMAGE), "labels": labels})
    assert by_id.status_code == 200 and sum(s["score"] for s in by_id.json()["scores"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "body",
    [
        {"image_id": 0, "labels": ["only one"]},
        {"image_id": 0, "labels": ["a", "a"]},
        {"image_id": 0, "labels": ["a", "   "]},
        {"image_id": 0, "labels": [f"l{i}" for i in range(1001)]},
        {"image_id": 0, "labels": ["a", "b"], "templates": ["no placeholder"]},
        {"image_id": 0, "labels": ["a", "b"], "templates": []},
        {"labels": ["a", "b"]},
        {"image": "AAAA", "image_id": 0, "labels": ["a", "b"]},
        {"image": b64(b"not an image"), "labels": ["a", "b"]},
    ],
)
def test_classify_rejects_bad_requests(client: httpx.Client, body: dict) -> None:
    r = client.post("/classify", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def _chat_images_body(real_image_root: Path, **extra: object) -> dict:
    data = (real_image_root / FIXTURE_IMAGE).read_bytes()
    return {"question": "What is in the image?", "images": [b64(data)], "max_new_tokens": 6, **extra}


def test_chat_with_images_matches_the_model(client: httpx.Client, chat_model, real_image_root: Path) -> None:  # noqa: ANN001
    r = client.post("/chat", json=_chat_images_body(real_image_root))
    assert r.status_code == 200, r.text
    expected = chat_model.chat(
        "What is in the image?", images=[open_image(real_image_root / FIXTURE_IMAGE)], max_new_tokens=6
    )
    assert r.json() == {"answer": expected, "sources": []}


def _read_sse(response: httpx.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def test_chat_stream_is_sse_of_pieces_then_sources(client: httpx.Client, real_image_root: Path) -> None:
    plain = client.post("/chat", json=_chat_images_body(real_image_root)).json()["answer"]
    r = client.post("/chat", json=_chat_images_body(real_image_root, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _read_sse(r)
    assert events[-1] == ("sources", {"sources": []})
    assert all(kind == "message" for kind, _ in events[:-1]) and len(events) > 1
    assert "".join(e["text"] for _, e in events[:-1]) == plain


def test_chat_with_history_and_images(client: httpx.Client, real_image_root: Path) -> None:
    body = _chat_images_body(real_image_root, history=[["Hi", "Hello!"]])
    r = client.post("/chat", json=body)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["answer"], str)


@pytest.mark.parametrize(
    "extra",
    [
        {"images": ["***"]},
        {"images": [b64(b"nope")]},
        {"max_num_tiles": 0},
        {"max_new_tokens": 0},
        {"temperature": -1},
        {"history": [["only user"]]},
        {"question": ""},
    ],
)
def test_chat_rejects_bad_requests(client: httpx.Client, real_image_root: Path, extra: dict) -> None:
    r = client.post("/chat", json=_chat_images_body(real_image_root, **extra))
    assert r.status_code == 422, r.text


def test_grounded_chat_returns_sources(client: httpx.Client) -> None:
    pytest.importorskip("chat.grounded")
    r = client.post("/chat", json={"question": "Which image is red?", "k": 2, "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str) and len(body["sources"]) == 2
    assert set(body["sources"][0]) == {"id", "path", "score"}
    r = client.post(
        "/chat", json={"question": "Which image is red?", "k": 2, "max_new_tokens": 5, "stream": True}
    )
    events = _read_sse(r)
    assert events[-1][0] == "sources" and events[-1][1]["sources"] == body["sources"]
    assert "".join(e["text"] for kind, e in events if kind == "message") == body["answer"]


@pytest.mark.parametrize("stream", [False, True])
def test_near_zero_temperature_is_greedy_not_a_crash(
    client: httpx.Client, real_image_root: Path, stream: bool
) -> None:
    """Found by the fuzz: temperature 1e-268 overflowed the logits to inf inside sampling."""
    greedy = client.post("/chat", json=_chat_images_body(real_image_root)).json()["answer"]
    r = client.post("/chat", json=_chat_images_body(real_image_root, temperature=1e-268, stream=stream))
    assert r.status_code == 200 and "event: error" not in r.text
    text = "".join(e["text"] for k, e in _read_sse(r) if k == "message") if stream else r.json()["answer"]
    assert text == greedy
    r = client.post("/chat", json={"question": "q", "k": 2, "max_new_tokens": 3, "temperature": 1e-268})
    assert r.status_code == 200, r.text
