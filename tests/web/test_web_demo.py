"""``python scripts/demo.py`` end to end: it prints the page's URL, and the page opened there finds the same
shape in all five languages of the demo model."""

from __future__ import annotations

import collections
import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from api_helpers import free_port
from shapes_vocab import LANGUAGES, noun_phrase
from web_helpers import CHROMIUM, SKIP_REASON, WebSession

from retrieval.loader import DEMO_MODEL_DIR

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=SKIP_REASON),
    pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built"),
]
ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 60


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo.py exited with {proc.returncode}")
        try:
            if httpx.get(url + "health", timeout=2).json().get("ready"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the demo server did not become ready")


def test_demo_prints_the_page_url_and_the_page_searches_five_languages(
    browser, tmp_path: Path  # noqa: ANN001
) -> None:
    port = free_port()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path / "demo"),
           "--n", str(N_IMAGES), "--port", str(port)]  # fmt: skip
    # its own process group: demo.py runs the server as a child, and both must stop at the end
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    printed: list[str] = []
    url_seen = threading.Event()

    def drain() -> None:  # keep reading: a full pipe would block the server's logging
        for line in proc.stdout:
            printed.append(line)
            if "open the web page:" in line:
                url_seen.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert url_seen.wait(180), "".join(printed)
        found = re.search(r"open the web page: (\S+)", "".join(printed))
        url = found.group(1)
        assert url == f"http://127.0.0.1:{port}/"
        _wait_ready(url, proc)

        with open(tmp_path / "demo" / "captions.csv", encoding="utf-8") as f:
            labels = {Path(r["file"]).name: (r["colour"], r["shape"]) for r in csv.DictReader(f)}
        (colour, shape), _ = collections.Counter(labels.values()).most_common(1)[0]
        web = WebSession.open(browser, url.rstrip("/"))
        try:
            web.goto("/")
            for lang in LANGUAGES:
                query = noun_phrase(shape, colour, None, lang, zh_de=True)
                web.search(query)
                top = web.page.text_content(f'[data-result-id="{web.result_ids()[0]}"] .name')
                assert labels.get(top) == (colour, shape), (lang, query, top)
            web.screenshot(tmp_path / "demo.png", full_page=False)
            web.assert_clean()
        finally:
            web.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
