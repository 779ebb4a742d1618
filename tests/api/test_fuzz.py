"""Schemathesis against the live server, through its CLI (``schemathesis run URL --checks all``): every
check, API key on and off, chat on and off. No failures means the OpenAPI document tells the truth: it admits
exactly the bodies the server accepts, declares security only when a key is required, and documents every
status the server answers.

Driven through the CLI rather than schemathesis' pytest plugin, whose internals break with new pytest
releases. ``schemathesis_hooks.py`` supplies real images for the ``image`` fields (JSON schema cannot say
"decodes as an image"); ``--generation-codec utf-8`` because the API takes valid Unicode text only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import serve

from api.app import create_app
from api.settings import Settings

HERE = Path(__file__).resolve().parent
API_KEY = "fuzz-key-0123"
MAX_EXAMPLES = 25
# With chat off, POST /chat answers its documented 503 ("chat is not configured"); every other operation,
# and /chat when chat is on, keeps the default (no 5xx at all).
CHAT_OFF_CONFIG = """
[[operations]]
include-path = "/chat"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

[[operations]]
include-path = "/v1/chat/completions"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


def _schemathesis() -> list[str]:
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.fail("the schemathesis CLI is not installed (pip install -e '.[dev]')")
    return [exe]


@pytest.fixture(
    scope="module",
    params=[(False, True), (True, True), (False, False), (True, False)],
    ids=["open-chat", "key-chat", "open-nochat", "key-nochat"],
)
def live_server(
    request: pytest.FixtureRequest, real_index_dir: Path, real_encoder, chat_model
) -> Iterator[tuple[str, bool, bool]]:  # noqa: ANN001,E501
    with_key, with_chat = request.param
    settings = Settings(
        index=str(real_index_dir),
        api_key=API_KEY if with_key else None,
        max_pixels=1_000_000,
        reload_interval_s=0,
    )
    app = create_app(settings, encoder=real_encoder, chat_model=chat_model if with_chat else None)
    with serve(app) as base:
        yield base, with_key, with_chat


def test_openapi_all_checks(live_server: tuple[str, bool, bool], tmp_path: Path) -> None:
    base, with_key, with_chat = live_server
    cmd = _schemathesis()
    if not with_chat:
        config = tmp_path / "schemathesis.toml"
        config.write_text(CHAT_OFF_CONFIG)
        cmd += ["--config-file", str(config)]
    cmd += [
        "run", f"{base}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "0",
        "--generation-codec", "utf-8",
        "--generation-database", "none",
        "--workers", "1",
        "--request-timeout", "60",
        "--no-color",
    ]  # fmt: skip
    if with_key:
        cmd += ["--header", f"Authorization: Bearer {API_KEY}"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20_000:]
    assert "No issues found" in report, report[-5_000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    assert selected and selected.group(1) == selected.group(2), report[-3_000:]
    assert int(selected.group(1)) >= 6, report[-3_000:]


def test_openapi_declares_security_only_with_a_key(real_index_dir: Path, real_encoder) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    for key in (None, API_KEY):
        app = create_app(Settings(index=str(real_index_dir), api_key=key), encoder=real_encoder)
        doc = TestClient(app).get("/openapi.json").json()
        search = doc["paths"]["/search"]["post"]
        if key is None:
            assert "security" not in search and "401" not in search["responses"]
            assert "securitySchemes" not in doc.get("components", {})
        else:
            assert search["security"] and "401" in search["responses"]
            assert set(doc["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}


def test_openapi_exactly_one_query_field() -> None:
    from api.schemas import ClassifyRequest, SearchRequest

    branches = SearchRequest.model_json_schema()["oneOf"]
    assert [b["required"] for b in branches] == [["text"], ["image"], ["image_id"]]
    branches = ClassifyRequest.model_json_schema()["oneOf"]
    assert [b["required"] for b in branches] == [["image"], ["image_id"], ["video"]]
