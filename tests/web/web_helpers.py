"""Browser-test helpers: launching Debian's Chromium through Playwright, a watched page per test."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Debian's Chromium (apt-get install chromium); Playwright never downloads a browser here
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_REASON = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)"
#: also copy every screenshot into this folder when set (for the closing note)
SCREENSHOT_DIR_ENV = "IVL_WEB_SCREENSHOTS"
TIMEOUT_MS = 60_000
#: a file name that is HTML: it must show as text and run nothing
XSS_NAME = "<img src=x onerror=alert(1)>.png"


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)


@dataclass
class Collection:
    images: Path
    index_dir: Path
    labels: dict[str, tuple[str, str]]  #: file name -> (colour, shape)
    clip: Path


@dataclass
class WebSession:
    """One browser context and page, recording console errors, page errors, dialogs and every request."""

    context: Any
    page: Any
    base_url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed_responses: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Any, base_url: str, **context_options: Any) -> WebSession:
        context = browser.new_context(**context_options)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        session = cls(context=context, page=page, base_url=base_url)
        page.on("console", lambda m: m.type == "error" and session.console_errors.append(m.text))
        page.on("pageerror", lambda e: session.page_errors.append(str(e)))
        page.on("request", lambda r: session.requests.append(r.url))
        page.on("response", lambda r: r.status >= 400 and session.failed_responses.append((r.status, r.url)))

        def dialog(d: Any) -> None:
            session.dialogs.append(f"{d.type}: {d.message}")
            d.dismiss()

        page.on("dialog", dialog)
        return session

    def goto(self, path: str = "/") -> Any:
        response = self.page.goto(self.base_url + path)
        self.page.wait_for_load_state("networkidle")
        return response

    def search(self, text: str, k: int | None = None) -> None:
        """Type ``text`` in the search box, press Enter, wait for the grid and its thumbnails."""
        page = self.page
        if k is not None:
            if not page.evaluate("document.getElementById('options').open"):
                page.click("#options summary")
            page.fill("#k", str(k))
        page.fill("input[name=q]", text)
        self.arm()
        page.press("input[name=q]", "Enter")
        self.wait_grid()

    def arm(self) -> None:
        """Mark the grid as stale, so that :meth:`wait_grid` waits for the next search's results."""
        self.page.evaluate("document.getElementById('results').dataset.state = 'submitted'")

    def wait_text(self, selector: str, text: str) -> None:
        """Wait until ``selector``'s text is ``text`` (a function: the CSP forbids eval of strings)."""
        script = "([sel, text]) => document.querySelector(sel)?.textContent === text"
        self.page.wait_for_function(script, arg=[selector, text])

    def wait_grid(self) -> None:
        self.page.wait_for_selector("#results[data-state=done]")

    def result_ids(self) -> list[int]:
        script = "els => els.map(e => e.dataset.resultId)"
        return [int(x) for x in self.page.eval_on_selector_all("[data-result-id]", script)]

    def assert_clean(self, allowed_statuses: tuple[int, ...] = ()) -> None:
        """No page errors, no dialogs, no console errors (but the network errors of ``allowed_statuses``),
        and every request went to this origin (or to the page's own blob: / data: URLs)."""
        assert not self.page_errors, self.page_errors
        assert not self.dialogs, self.dialogs
        expected = [s for s, _ in self.failed_responses if s in allowed_statuses]
        unexpected = [(s, u) for s, u in self.failed_responses if s not in allowed_statuses]
        assert not unexpected, unexpected
        errors = [e for e in self.console_errors if not (expected and "Failed to load resource" in e)]
        assert not errors, errors
        own = (self.base_url + "/", "blob:", "data:")
        foreign = [u for u in self.requests if not u.startswith(own)]
        assert not foreign, foreign

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=full_page)
        extra = os.environ.get(SCREENSHOT_DIR_ENV)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(extra) / path.name)
        return path

    def close(self) -> None:
        self.context.close()
