"""A real server with the bundled demo models: grounded /chat retrieves and answers about the right image."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import httpx
import pytest
from api_helpers import build_index, serve

from chat.loader import DEMO_CHAT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not (DEMO_CHAT_MODEL_DIR / "config.json").is_file(), reason="demo chat model not built"
)
#: one image per (shape, colour): each grounded question below has exactly one matching image
SCENE = (("circle", "red"), ("square", "blue"), ("triangle", "green"), ("star", "yellow"),
         ("heart", "purple"), ("cross", "black"), ("hexagon", "orange"), ("square", "pink"))  # fmt: skip


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory):
    sys.path.insert(0, str(ROOT / "scripts"))
    import chat_shapes

    from api.app import create_app
    from api.settings import Settings
    from retrieval import load_encoder

    root = tmp_path_factory.mktemp("demo_chat_images")
    paths = []
    for i, (shape, colour) in enumerate(SCENE):
        image, _ = chat_shapes.single_shape(random.Random(7000 + i), shape, colour)
        path = root / f"{i}_{colour}_{shape}.png"
        image.save(path)
        paths.append(path)
    encoder = load_encoder("demo", device="cpu")
    index_dir = tmp_path_factory.mktemp("demo_chat_index")
    build_index(index_dir, encoder, paths, root=root).close()
    settings = Settings(index=str(index_dir), chat_model="demo", device="cpu")  # as `--chat-model demo`
    with serve(create_app(settings, encoder=encoder)) as base:
        yield base


@pytest.mark.parametrize(("question", "name"), [
    ("Which picture has a red circle?", "red_circle"),
    ("Which image shows a green triangle?", "green_triangle"),
    ("哪张图片里有紫色的心形？", "purple_heart"),
])  # fmt: skip
def test_grounded_which_image_cites_the_matching_source(demo_url: str, question: str, name: str) -> None:
    """The answer names the cited image that matches (the model's own which-image skill is measured in
    tests/chat/test_demo_chat_model.py, where the match is not the first image)."""
    with httpx.Client(base_url=demo_url, timeout=60) as client:
        r = client.post("/chat", json={"question": question})
    assert r.status_code == 200, r.text
    body = r.json()
    paths = [s["path"] for s in body["sources"]]
    assert len(paths) == 3 and any(p.endswith(f"{name}.png") for p in paths), paths
    expected = next(i for i, p in enumerate(paths) if p.endswith(f"{name}.png")) + 1
    assert body["answer"] == f"Image-{expected}", body


@pytest.mark.parametrize(("question", "lang", "name"), [
    ("What color is the star?", "en", "yellow_star"),
    ("五角星是什么颜色？", "zh", "yellow_star"),
    ("What colour is the heart?", "en", None),  # the demo encoder retrieves the star for this one
])  # fmt: skip
def test_grounded_colour_of_the_retrieved_shape(
    demo_url: str, question: str, lang: str, name: str | None
) -> None:
    """k=1: the answer is the colour of the image retrieved (and cited), in the question's language."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from chat_shapes import COLOUR_ANSWERS

    with httpx.Client(base_url=demo_url, timeout=60) as client:
        r = client.post("/chat", json={"question": question, "k": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    (source,) = body["sources"]
    if name is not None:
        assert source["path"].endswith(f"{name}.png"), body
    colour = Path(source["path"]).stem.split("_")[1]
    assert body["answer"] == COLOUR_ANSWERS[lang][colour], body
