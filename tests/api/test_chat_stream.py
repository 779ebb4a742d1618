"""SSE streaming edge cases with a scripted chat model: disconnects stop generation, errors are in-band."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_helpers import FakeEncoder, b64, png_bytes, serve

from api.app import create_app
from api.settings import Settings


class ScriptedChat:
    """Yields ``n`` pieces slowly; ``fail_at`` raises mid-stream; records whether it was closed early."""

    name = "scripted-chat"

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.fail_at: int | None = None

    def stream(self, question: str, images=None, **kwargs) -> Iterator[str]:  # noqa: ANN001, ANN003
        try:
            for i in range(200):
                if i == self.fail_at:
                    raise RuntimeError("scripted failure")
                time.sleep(0.02)
                yield f"p{i} "
        except GeneratorExit:
            self.closed.set()
            raise

    def chat(self, question: str, images=None, **kwargs) -> str:  # noqa: ANN001, ANN003
        return "".join(self.stream(question, images))


@pytest.fixture(scope="module")
def chat() -> ScriptedChat:
    return ScriptedChat()


@pytest.fixture(scope="module")
def url(fake_index_dir: Path, fake_encoder: FakeEncoder, chat: ScriptedChat):
    settings = Settings(index=str(fake_index_dir), reload_interval_s=0)
    with serve(create_app(settings, encoder=fake_encoder, chat_model=chat)) as base:
        yield base


def _body() -> dict:
    return {"question": "q", "images": [b64(png_bytes())], "stream": True}


def test_client_disconnect_stops_generation(url: str, chat: ScriptedChat) -> None:
    chat.fail_at = None
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/chat", json=_body()) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())
            assert first.startswith("data: ")
    assert chat.closed.wait(5), "generation kept running after the client went away"


def test_error_mid_stream_is_an_sse_error_event(url: str, chat: ScriptedChat) -> None:
    chat.fail_at = 3
    r = httpx.post(url + "/chat", json=_body(), timeout=30)
    assert r.status_code == 200
    assert r.text.count('data: {"text"') == 3
    assert r.text.rstrip().endswith('event: error\ndata: {"detail": "generation failed"}')


def test_error_before_first_piece_is_a_plain_status(url: str, chat: ScriptedChat) -> None:
    chat.fail_at = 0  # RuntimeError before anything was sent: the catch-all answers a JSON 500
    r = httpx.post(url + "/chat", json=_body(), timeout=30)
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
