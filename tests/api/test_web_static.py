"""The page's files over HTTP, without a browser: ``/`` and ``/static/...`` with the security headers, only
the page's own files, shipped as package data, and no reference to another origin or inline script."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
from api_helpers import FakeEncoder, serve

from api.app import create_app
from api.settings import Settings
from api.web import STATIC_DIR
from api.web.page import STATIC_FILES

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_CSP = [
    "script-src 'self'",
    "connect-src 'self'",
    "img-src 'self' blob: data:",
    "media-src 'self' blob:",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
]


@pytest.fixture(scope="module")
def url(fake_index_dir: Path) -> Iterator[str]:
    settings = Settings(index=str(fake_index_dir), api_key="k", reload_interval_s=0)
    with serve(create_app(settings, encoder=FakeEncoder())) as base:
        yield base


def _directives(header: str) -> set[str]:
    return {d.strip() for d in header.split(";") if d.strip()}


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/app.css"])
def test_page_and_files_are_public_with_the_csp(url: str, path: str) -> None:
    r = httpx.get(url + path, timeout=30)  # no API key: the page is public
    assert r.status_code == 200, r.text
    csp = _directives(r.headers["content-security-policy"])
    assert set(REQUIRED_CSP) <= csp
    assert not any("unsafe-inline" in d or "unsafe-eval" in d for d in csp)
    assert r.headers["x-content-type-options"] == "nosniff"


def test_the_page_has_the_contract_names(url: str) -> None:
    r = httpx.get(url + "/", timeout=30)
    assert r.headers["content-type"].startswith("text/html")
    assert '<input id="q" name="q"' in r.text
    assert '<script type="module" src="/static/app.js"></script>' in r.text
    js = httpx.get(url + "/static/app.js", timeout=30)
    assert js.headers["content-type"].startswith("text/javascript")


def test_only_the_page_files_are_served(url: str) -> None:
    bad = ("/static/../thumbnails.py", "/static/thumbs.py", "/static/%2e%2e/page.py", "/static/nope.js")
    for path in bad:
        assert httpx.get(url + path, timeout=30).status_code == 404, path
    assert STATIC_FILES >= {"index.html", "app.js", "api.js", "dom.js", "search.js", "panels.js", "app.css"}


def test_no_inline_script_no_html_injection_no_other_origin() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script>"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://", text.replace("http://www.w3.org/2000/svg", "")), path.name
        if path.suffix == ".js":  # untrusted text goes in as text nodes
            assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", text), path
    assert "X-API-Key" in (STATIC_DIR / "api.js").read_text()


def test_static_files_are_package_data() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["api"]
    for path in STATIC_DIR.iterdir():
        rel = path.relative_to(ROOT / "api").as_posix()
        assert any(fnmatch(rel, p) for p in patterns), f"{rel} is not package data"
