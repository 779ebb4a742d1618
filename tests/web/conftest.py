"""Browser-test fixtures: a small demo collection indexed with the bundled demo model, Debian's Chromium
driven by Playwright (one browser per module), a fresh context per test with its console watched."""

from __future__ import annotations

import csv
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
for extra in (TESTS / "api", ROOT / "scripts"):  # api_helpers.serve; generate_shapes and demo's clips
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from web_helpers import XSS_NAME, Collection, WebSession, launch  # noqa: E402

N_IMAGES = 100
SEED = 5


@pytest.fixture(scope="session")
def demo_encoder():  # noqa: ANN201
    from retrieval import load_encoder
    from retrieval.loader import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not built")
    return load_encoder("demo", device="cpu")


@pytest.fixture(scope="session")
def collection(tmp_path_factory: pytest.TempPathFactory, demo_encoder) -> Collection:  # noqa: ANN001
    """100 generated shapes, one file named like HTML, one demo clip (1 s segments), indexed."""
    import demo
    import generate_shapes

    from index.builder import build_index

    out = tmp_path_factory.mktemp("web_collection")
    generate_shapes.main(["--out", str(out), "--n", str(N_IMAGES), "--seed", str(SEED)])
    images = out / "images"
    with open(out / "captions.csv", encoding="utf-8") as f:
        labels = {Path(r["file"]).name: (r["colour"], r["shape"]) for r in csv.DictReader(f)}
    first = sorted(images.glob("*.png"))[0]
    shutil.copyfile(first, images / XSS_NAME)
    labels[XSS_NAME] = labels[first.name]
    clip = demo.render_video(images / "clip_00.mp4", demo.VIDEO_SCENES[1], seed=3)
    index_dir = out / "index"
    build_index([str(images)], index_dir, demo_encoder, workers=0, progress=False, video_segments=1.0)
    return Collection(images=images, index_dir=index_dir, labels=labels, clip=clip)


@pytest.fixture(scope="session")
def chat_model():  # noqa: ANN201
    from chat import load_chat_model

    return load_chat_model(str(TESTS / "fixtures" / "internvl_chat_tiny"))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def web(browser, base_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WebSession]:  # noqa: ANN001
    """A fresh browser context (empty storage and HTTP cache) on the module's server; saves a screenshot."""
    session = WebSession.open(browser, base_url)
    try:
        yield session
    finally:
        session.screenshot(tmp_path / f"{request.node.name}-final.png")
        session.close()
