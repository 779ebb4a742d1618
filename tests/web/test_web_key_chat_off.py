"""The page against a server that needs an API key and has no chat model: the key is asked once, kept in
local storage and sent as X-API-Key (thumbnails and videos included); the ask panel says chat is off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import serve
from web_helpers import CHROMIUM, SKIP_REASON, Collection, WebSession

from api.app import create_app
from api.settings import Settings

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=SKIP_REASON)
KEY = "s3cret-web-key"


@pytest.fixture(scope="module")
def base_url(collection: Collection, demo_encoder) -> Iterator[str]:  # noqa: ANN001
    settings = Settings(index=str(collection.index_dir), api_key=KEY, reload_interval_s=0)
    with serve(create_app(settings, encoder=demo_encoder)) as base:
        yield base


def test_chat_off_says_so_and_sends_nothing(web: WebSession, tmp_path: Path) -> None:
    web.goto("/")
    web.page.wait_for_selector("#chat-off:not([hidden])")
    assert "Chat is not configured" in web.page.text_content("#chat-off")
    assert web.page.is_disabled("#ask-submit") and web.page.is_disabled("#question")
    assert not any(u.endswith("/chat") for u in web.requests)
    web.screenshot(tmp_path / "chat-off.png", full_page=False)
    web.assert_clean()  # /health is public: no key asked, no error


def test_api_key_is_asked_once_kept_and_sent(web: WebSession, tmp_path: Path) -> None:
    page = web.page
    web.goto("/")
    page.fill("input[name=q]", "a red circle")
    page.press("input[name=q]", "Enter")
    page.wait_for_selector("#key-dialog[open]")  # the search answered 401
    page.fill("#api-key", "wrong")
    page.click("#key-form button[value=save]")
    page.wait_for_selector("#message:not([hidden])")
    assert "401" in page.text_content("#message") and "invalid API key" in page.text_content("#message")

    page.click("#key-button")
    page.wait_for_selector("#key-dialog[open]")
    assert page.input_value("#api-key") == "wrong"
    page.fill("#api-key", KEY)
    page.click("#key-form button[value=save]")
    page.wait_for_function("key => localStorage.getItem('ivl-api-key') === key", arg=KEY)  # on close
    web.search("a red circle")
    assert len(web.result_ids()) == 24
    assert page.locator("#results img[data-loaded=true]").count() == 24  # thumbnails sent the key too
    assert page.evaluate("localStorage.getItem('ivl-api-key')") == KEY

    page.reload()  # kept: no prompt after a reload
    page.wait_for_load_state("networkidle")
    web.search("un cercle rouge")
    assert not page.locator("#key-dialog").get_attribute("open")
    assert page.locator("#results img[data-loaded=true]").count() == 24
    web.screenshot(tmp_path / "with-key.png", full_page=False)

    web.search("a pink circle", k=200)  # a video moment: its video is fetched with the key, from its start
    page.locator(".result.kind-segment", has_text="moment 0:03–0:04").locator("button").click()
    page.wait_for_function("() => document.querySelector('#detail-media video')?.readyState >= 1")
    state = page.eval_on_selector("#detail-media video", "v => ({t: v.currentTime, src: v.src})")
    assert state["src"].startswith("blob:") and abs(state["t"] - 3.0) < 0.2, state
    page.keyboard.press("Escape")

    page.click("#key-button")
    page.click("#key-form button[value=forget]")
    page.wait_for_function("() => localStorage.getItem('ivl-api-key') === null")  # set on the dialog's close
    web.assert_clean(allowed_statuses=(401,))
