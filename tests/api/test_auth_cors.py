"""Optional API key (Bearer or X-API-Key) and opt-in CORS, over HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from api_helpers import FakeEncoder, serve

from api.app import create_app
from api.settings import Settings

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def url(fake_index_dir: Path, fake_encoder: FakeEncoder):
    settings = Settings(
        index=str(fake_index_dir), api_key=KEY, cors_origins=["http://app.example"], reload_interval_s=0
    )
    with serve(create_app(settings, encoder=fake_encoder)) as base:
        yield base


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/search", {"text": "a"}),
        ("POST", "/classify", {"image_id": 0, "labels": ["a", "b"]}),
        ("POST", "/chat", {"question": "q"}),
        ("GET", "/images/1", None),
        ("POST", "/admin/reload", None),
    ],
)
def test_protected_endpoints_need_the_key(url: str, method: str, path: str, body: dict | None) -> None:
    r = httpx.request(method, url + path, json=body)
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.request(method, url + path, json=body, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid API key"
    r = httpx.request(method, url + path, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_key_accepted_as_bearer_or_header(url: str) -> None:
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        r = httpx.post(url + "/search", json={"text": "a", "k": 2}, headers=headers)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 2
    r = httpx.post(url + "/admin/reload", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["index_size"] == 6


def test_health_metrics_docs_stay_open(url: str) -> None:
    for path in ("/health", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(url + path).status_code == 200, path


def test_cors_when_configured(url: str) -> None:
    r = httpx.options(
        url + "/search",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key,content-type",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(url + "/health", headers={"Origin": "http://other.example"})
    assert "access-control-allow-origin" not in r.headers
