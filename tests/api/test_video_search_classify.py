"""Videos in the index over the real server: ``/search`` results carry ``kind`` / ``t_start`` / ``t_end``,
``/images/{id}`` serves the video file, ``/classify`` takes a ``video`` or a video row's ``image_id``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from api_helpers import b64, make_images, serve

from api.app import create_app
from api.settings import Settings
from index import Index
from index.builder import build_index
from retrieval.video import embed_video
from retrieval.zero_shot import classify

FPS = 12
MAX_PIXELS = 1_000_000
LABELS = ["a red circle", "a blue square", "a green square", "a photo of a dog"]


def make_clip(path: Path, n: int, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """``n`` frames at ``FPS`` whose colour drifts (distinct per ``seed``), H.264 by PyAV."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(int)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            blocks = np.clip(base + (i * 9) % 200 - 100, 0, 255).astype(np.uint8)
            img = np.kron(blocks, np.ones((size[1] // 4, size[0] // 4, 1), dtype=np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _shape_frame(shape: str, colour: tuple[int, int, int], i: int, size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = size / 2 + (i % 6) - 3, size / 2, size * 0.3
    mask = (
        (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        if shape == "circle"
        else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    )
    img = np.full((size, size, 3), 235, np.uint8)
    img[mask] = colour
    return img


def make_scenes(path: Path) -> Path:
    """3 s: a blue square, then a red circle, then a green square (one second each)."""
    scenes = [("square", (30, 60, 220)), ("circle", (220, 30, 30)), ("square", (40, 180, 60))]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width = stream.height = 96
        stream.pix_fmt = "yuv420p"
        for shape, colour in scenes:
            for i in range(FPS):
                frame = av.VideoFrame.from_ndarray(_shape_frame(shape, colour, i), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _demo_encoder():  # noqa: ANN202
    from retrieval import load_encoder
    from retrieval.loader import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not built")
    return load_encoder("demo", device="cpu")


@pytest.fixture(scope="module")
def encoder():  # noqa: ANN201
    return _demo_encoder()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("library")
    make_images(folder / "photos", 3, size=(48, 40))
    (folder / "clips").mkdir()
    make_scenes(folder / "clips" / "scenes.mp4")
    make_clip(folder / "clips" / "other.mp4", 2 * FPS, seed=5)
    return folder


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, library: Path, encoder) -> Path:  # noqa: ANN001
    index_dir = tmp_path_factory.mktemp("video_index")
    report = build_index(
        [str(library)], index_dir, encoder, workers=0, batch_size=16, max_pixels=MAX_PIXELS,
        progress=False, video_segments=1.0,
    )  # fmt: skip
    assert (report.videos, report.segments) == (2, 5)
    return index_dir


@pytest.fixture(scope="module")
def rows(index_dir: Path) -> dict[int, dict]:
    with Index.open(index_dir) as idx:
        return {r["id"]: r for r in idx.get(idx.ids().tolist()) if r is not None}


@pytest.fixture(scope="module")
def url(index_dir: Path, encoder, library: Path) -> Iterator[str]:  # noqa: ANN001
    settings = Settings(index=str(index_dir), max_pixels=MAX_PIXELS, reload_interval_s=0)
    with serve(create_app(settings, encoder=encoder)) as base:
        yield base


def _row(rows: dict[int, dict], name: str, kind: str, t_start: float | None = None) -> dict:
    def match(r: dict) -> bool:
        same = os.path.basename(r["path"]) == name and r["kind"] == kind
        return same and (t_start is None or r["t_start"] == t_start)

    (row,) = [r for r in rows.values() if match(r)]
    return row


def test_search_results_carry_kind_and_times(url: str, rows: dict[int, dict]) -> None:
    r = httpx.post(url + "/search", json={"text": "a red circle", "k": len(rows)}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(rows)
    for res in results:
        row = rows[res["id"]]
        assert res["kind"] == row["kind"]
        if row["kind"] == "image":
            assert res["t_start"] is None and res["t_end"] is None
        else:
            assert (res["t_start"], res["t_end"]) == (row["t_start"], row["t_end"])
    kinds = sorted(res["kind"] for res in results)
    assert kinds == ["image"] * 3 + ["segment"] * 5 + ["video"] * 2
    scenes = sorted(
        (res["t_start"], res["t_end"])
        for res in results
        if res["kind"] == "segment" and os.path.basename(res["path"]) == "scenes.mp4"
    )
    assert scenes == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]


@pytest.mark.parametrize(
    ("text", "start"), [("a red circle", 1.0), ("a blue square", 0.0), ("a green square", 2.0)]
)
def test_text_search_finds_the_moment(url: str, text: str, start: float) -> None:
    r = httpx.post(url + "/search", json={"text": text, "k": 20}, timeout=60)
    assert r.status_code == 200, r.text
    top = next(res for res in r.json()["results"] if res["kind"] == "segment")
    assert (os.path.basename(top["path"]), top["t_start"], top["t_end"]) == ("scenes.mp4", start, start + 1.0)


def test_images_serves_the_video_file(url: str, rows: dict[int, dict], library: Path) -> None:
    data = (library / "clips" / "scenes.mp4").read_bytes()
    for kind, t_start in (("video", None), ("segment", 1.0)):
        row = _row(rows, "scenes.mp4", kind, t_start)
        r = httpx.get(f"{url}/images/{row['id']}", timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("video/mp4")
        assert r.content == data
    image = _row(rows, "img0.png", "image")
    r = httpx.get(f"{url}/images/{image['id']}", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/png")


def test_openapi_documents_video(url: str) -> None:
    doc = httpx.get(url + "/openapi.json", timeout=60).json()
    content = doc["paths"]["/images/{image_id}"]["get"]["responses"]["200"]["content"]
    assert {"image/*", "video/*"} <= set(content)
    schemas = doc["components"]["schemas"]
    assert {"kind", "t_start", "t_end"} <= set(schemas["SearchResult"]["properties"])
    classify_schema = schemas["ClassifyRequest"]
    assert [b["required"] for b in classify_schema["oneOf"]] == [["image"], ["image_id"], ["video"]]


def test_classify_an_uploaded_video(url: str, encoder, library: Path) -> None:  # noqa: ANN001
    path = library / "clips" / "scenes.mp4"
    vector = embed_video(encoder, path, max_pixels=MAX_PIXELS).vector
    expected = classify(encoder, vector[None, :], LABELS)[0]
    r = httpx.post(url + "/classify", json={"video": b64(path.read_bytes()), "labels": LABELS}, timeout=120)
    assert r.status_code == 200, r.text
    got = {s["label"]: s["score"] for s in r.json()["scores"]}
    np.testing.assert_allclose([got[label] for label in LABELS], expected, atol=1e-4)
    assert r.json()["label"] == LABELS[int(np.argmax(expected))]


def test_classify_a_video_row(url: str, encoder, rows: dict[int, dict], library: Path) -> None:  # noqa: ANN001
    path = library / "clips" / "scenes.mp4"
    embedding = embed_video(encoder, path, segment_seconds=1.0, max_pixels=MAX_PIXELS)
    cases = [(_row(rows, "scenes.mp4", "video"), embedding.vector)]
    cases += [(_row(rows, "scenes.mp4", "segment", s.t_start), s.vector) for s in embedding.segments]
    for row, vector in cases:
        expected = classify(encoder, vector[None, :], LABELS)[0]
        r = httpx.post(url + "/classify", json={"image_id": row["id"], "labels": LABELS}, timeout=60)
        assert r.status_code == 200, r.text
        got = {s["label"]: s["score"] for s in r.json()["scores"]}
        # the index stores float16 vectors
        np.testing.assert_allclose([got[label] for label in LABELS], expected, atol=5e-3)


def test_classify_video_errors(
    tmp_path_factory: pytest.TempPathFactory, index_dir: Path, encoder, library: Path
) -> None:  # noqa: ANN001,E501
    clip = (library / "clips" / "scenes.mp4").read_bytes()
    settings = Settings(index=str(index_dir), max_pixels=MAX_PIXELS, reload_interval_s=0,
                        max_video_bytes=len(clip) - 1)  # fmt: skip
    with serve(create_app(settings, encoder=encoder)) as base:
        r = httpx.post(base + "/classify", json={"video": b64(clip), "labels": LABELS}, timeout=60)
        assert r.status_code == 413, r.text
        r = httpx.post(base + "/classify", json={"video": b64(b"not a video"), "labels": LABELS}, timeout=60)
        assert r.status_code == 422 and r.json()["detail"]["reason"], r.text
        r = httpx.post(
            base + "/classify", json={"video": b64(clip), "image_id": 0, "labels": LABELS}, timeout=60
        )
        assert r.status_code == 422, r.text
    settings = Settings(
        index=str(index_dir), max_pixels=MAX_PIXELS, reload_interval_s=0, max_video_duration_s=1.0
    )
    with serve(create_app(settings, encoder=encoder)) as base:
        r = httpx.post(base + "/classify", json={"video": b64(clip), "labels": LABELS}, timeout=60)
        assert r.status_code == 422 and "limit" in r.text, r.text
