"""Every endpoint and every error over HTTP against a real uvicorn server (fake encoder, real index)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from api_helpers import FakeEncoder, b64, png_bytes, serve

from api.app import create_app
from api.settings import Settings

MAX_BODY = 1_000_000
MAX_PIXELS = 100_000


@pytest.fixture(scope="module")
def url(fake_index_dir: Path, fake_encoder: FakeEncoder):
    settings = Settings(
        index=str(fake_index_dir), max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, reload_interval_s=0
    )
    with serve(create_app(settings, encoder=fake_encoder)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def _paths(image_root: Path) -> list[str]:
    return [str(p.absolute()) for p in sorted(image_root.glob("*.png"))]


def test_health(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True
    assert body["index_size"] == 6
    assert body["models"]["encoder"] == "fake-encoder" and body["models"]["embed_dim"] == 8
    assert body["models"]["chat"] is None
    assert body["device"] == "cpu"


def test_search_text(client: httpx.Client, image_root: Path) -> None:
    r = client.post("/search", json={"text": "a red square", "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == 4 and body["took_ms"] >= 0
    assert set(results[0]) == {"id", "path", "score", "kind", "t_start", "t_end", "caption", "found_by"}
    assert all(x["kind"] == "image" and x["t_start"] is None and x["t_end"] is None for x in results)
    scores = [x["score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert {x["path"] for x in results} <= set(_paths(image_root))
    assert client.post("/search", json={"text": "a red square"}).json()["results"].__len__() == 6  # k>n: all


def test_search_image_base64_and_upload_find_the_same_file(client: httpx.Client, image_root: Path) -> None:
    path = sorted(image_root.glob("*.png"))[3]
    data = path.read_bytes()
    r = client.post("/search", json={"image": b64(data), "k": 2})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["path"] == str(path.absolute()) and top["score"] == pytest.approx(1.0, abs=1e-2)
    r = client.post("/search", json={"image": "data:image/png;base64," + b64(data), "k": 2})
    assert r.json()["results"][0]["path"] == str(path.absolute())
    r = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3 and r.json()["results"][0]["path"] == str(path.absolute())
    r = client.post("/search", data={"text": "hello", "k": "2"}, files={"unused": ("", b"")})
    assert r.status_code == 422


def test_search_image_id(client: httpx.Client) -> None:
    first = client.post("/search", json={"text": "x", "k": 1}).json()["results"][0]
    r = client.post("/search", json={"image_id": first["id"], "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == first["id"]
    assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize(
    "body",
    [
        {"text": "a", "k": 0},
        {"text": "a", "k": 1001},
        {"text": "a", "k": "many"},
        {},
        {"k": 3},
        {"text": "a", "image_id": 0},
        {"text": ""},
        {"text": "a", "colour": "red"},
        b'{"text": "\\ud800"}',  # lone surrogate escape: valid JSON, invalid Unicode
        {"image_id": -1},
    ],
)
def test_search_rejects_bad_requests(client: httpx.Client, body: dict | bytes) -> None:
    if isinstance(body, bytes):
        r = client.post("/search", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list) and r.json()["detail"]


def test_search_bad_images_are_422(client: httpx.Client) -> None:
    for image, reason in [("not base64!!", "base64"), (b64(b"definitely not an image"), "recognised")]:
        r = client.post("/search", json={"image": image})
        assert r.status_code == 422 and reason in r.json()["detail"], r.text
    r = client.post("/search", json={"image": b64(png_bytes()[:40])})
    assert r.status_code == 422 and "detail" in r.json()
    r = client.post("/search", json={"image": b64(png_bytes((400, 400)))})  # 160k pixels > 100k
    assert r.status_code == 422 and "limit" in r.json()["detail"] and r.json()["reason"] == "too_large"
    r = client.post("/search", files={"image": ("e.png", b"", "image/png")})
    assert r.status_code == 422 and "empty" in r.json()["detail"]


def test_search_malformed_body(client: httpx.Client) -> None:
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/search", content=b"text", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "content type" in r.json()["detail"]


def test_unknown_image_id_is_404(client: httpx.Client) -> None:
    for method, path, body in [
        ("POST", "/search", {"image_id": 123456}),
        ("POST", "/classify", {"image_id": 123456, "labels": ["a", "b"]}),
        ("GET", "/images/123456", None),
    ]:
        r = client.request(method, path, json=body)
        assert r.status_code == 404, (path, r.text)
        assert "123456" in r.json()["detail"]


def test_body_limit_413(client: httpx.Client) -> None:
    big = b"x" * (MAX_BODY + 10)
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(20):
            yield b"y" * 100_000

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413


def test_get_image_serves_indexed_file(client: httpx.Client, image_root: Path) -> None:
    first = client.post("/search", json={"text": "x", "k": 1}).json()["results"][0]
    r = client.get(f"/images/{first['id']}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.content == Path(first["path"]).read_bytes()
    assert client.get("/images/-1").status_code == 422
    assert client.get("/images/abc").status_code == 422
    assert client.get("/images/..%2f..%2fetc%2fpasswd").status_code in (404, 422)


def test_unknown_route_and_method_are_json(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = client.get("/search")
    assert r.status_code == 405 and "detail" in r.json()


def test_chat_without_model_is_503(client: httpx.Client) -> None:
    r = client.post("/chat", json={"question": "what is in the archive?"})
    assert r.status_code == 503
    assert "--chat-model" in r.json()["detail"]


def test_docs_and_openapi(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {
        "/search",
        "/classify",
        "/chat",
        "/health",
        "/metrics",
        "/images/{image_id}",
        "/admin/reload",
    } <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/search"]["post"]["requestBody"]["content"]


def test_metrics(client: httpx.Client) -> None:
    client.post("/search", json={"text": "metrics", "k": 1})
    text = client.get("/metrics").text
    assert 'ivl_http_requests_total{endpoint="/search",method="POST",status="200"}' in text
    assert 'ivl_http_request_duration_seconds_bucket{endpoint="/search"' in text
    assert 'ivl_encoder_batch_size_count{kind="text"}' in text
    assert "ivl_index_size 6.0" in text


def test_no_cors_by_default(client: httpx.Client) -> None:
    r = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_images_outside_root_are_refused(tmp_path: Path) -> None:
    from fastapi import HTTPException

    from api.routes.images import resolve_indexed_file

    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    inside = root / "ok.png"
    inside.write_bytes(png_bytes())
    link = root / "link.png"
    os.symlink(outside, link)
    assert resolve_indexed_file({"id": 1, "path": str(inside), "root": str(root)}, []) == inside.resolve()
    for row in (
        {"id": 2, "path": str(link), "root": str(root)},  # symlink escaping the root
        {"id": 3, "path": str(root / ".." / "secret.png"), "root": str(root)},  # dot-dot escape
        {"id": 4, "path": str(root / "missing.png"), "root": str(root)},
        {"id": 5, "path": "/etc/passwd", "root": "/etc"},  # not an image file
    ):
        with pytest.raises(HTTPException) as err:
            resolve_indexed_file(row, [])
        assert err.value.status_code == 404


@pytest.mark.parametrize("raw", [b"[]", b"null", b"1", b'"text"', b"", b"\xff\xfe"])
def test_search_odd_json_bodies_are_4xx(client: httpx.Client, raw: bytes) -> None:
    r = client.post("/search", content=raw, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code in (400, 422), r.text
    assert "detail" in r.json()


def test_search_multipart_variants(client: httpx.Client, image_root: Path) -> None:
    data = sorted(image_root.glob("*.png"))[1].read_bytes()
    r = client.post("/search", data={"image": b64(data), "k": "1"})  # base64 text field instead of a file
    assert r.status_code == 200 and r.json()["results"][0]["path"].endswith("img1.png")
    r = client.post("/search", files=[("image", ("a.png", data)), ("image", ("b.png", data))])
    assert r.status_code in (400, 422) and "detail" in r.json()
    r = client.post("/search", data={"image_id": "not a number"})
    assert r.status_code == 422
    r = client.post("/search", data={"text": "x", "k": "0"})
    assert r.status_code == 422
    r = client.post("/search", files={"other": ("a.png", data)})
    assert r.status_code == 422 and "'other'" in r.json()["detail"]


def test_validation_errors_do_not_echo_the_input(client: httpx.Client) -> None:
    r = client.post("/search", json={"image": "A" * 100_000, "text": "x"})
    assert r.status_code == 422 and len(r.content) < 2_000


@pytest.mark.parametrize(
    "content_type,raw",
    [
        ("multipart/form-data", b"--x\r\n"),  # no boundary parameter
        ("multipart/form-data; boundary=x", b"garbage without parts"),
        ("multipart/form-data; boundary=x", b""),
        ("application/x-www-form-urlencoded", b"%%%=%%%"),
    ],
)
def test_search_broken_forms_are_4xx(client: httpx.Client, content_type: str, raw: bytes) -> None:
    r = client.post("/search", content=raw, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert "detail" in r.json()
