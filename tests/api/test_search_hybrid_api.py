"""/search modes, filters, paging, dedup and captions, and GET /duplicates, over a real index; plus the
build's caption pass (resumable) with a captioning stub encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from api_helpers import FakeEncoder, make_images
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.settings import Settings
from index import Index


class CaptioningEncoder(FakeEncoder):
    """The fake encoder with a deterministic ``caption`` (the signature of InternVL encoders')."""

    def __init__(self) -> None:
        super().__init__()
        self.captioned: list[int] = []

    def caption(self, images, prompt="English caption:", *, num_beams=5, min_new_tokens=8, max_new_tokens=30,
                **generate_kwargs):  # noqa: ANN001,ANN201  # fmt: skip
        self.captioned.append(len(images))
        return [f"{prompt} a picture {im.width}x{im.height} 白板" for im in images]


def _distinct_images(folder: Path, n: int) -> list[Path]:
    """Random 4x4 colour blocks, centred (the fake encoder's embedding is a projection of the pixels)."""
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        blocks = rng.integers(0, 256, (4, 4, 3)).astype(np.int16) - 128
        arr = (np.kron(blocks, np.ones((6, 8, 1), dtype=np.int16)) + 128).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("hy_photos")
    paths = _distinct_images(root, n=8)
    invoice = root / "IMG_2024_invoice.png"
    shutil.copy(paths[0], invoice)  # a byte-identical copy: a near-duplicate of img0
    index_dir = tmp_path_factory.mktemp("hy_index")
    enc = FakeEncoder()
    vectors = np.random.default_rng(1).standard_normal((9, enc.embed_dim)).astype(np.float32)
    vectors[8] = vectors[0]  # distinct random embeddings; the copy's equals its original's
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    idx = Index.create(index_dir, enc.embed_dim, model=enc.name, mode=enc.mode)
    rel = [p.name for p in [*paths, invoice]]
    idx.add(vectors, [{"root": str(root), "relpath": r, "width": 32, "height": 24, "size": 10} for r in rel])
    idx.set_captions({3: "a whiteboard with notes"})
    idx.save()
    idx.close()
    app = create_app(Settings(index=str(index_dir), max_pixels=1_000_000), encoder=FakeEncoder())
    with TestClient(app) as c:
        yield c


def _search(client, **body):  # noqa: ANN001,ANN202
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_keyword_and_hybrid_find_a_file_by_name_vector_does_not(client):
    vector = _search(client, text="invoice", k=3)
    assert all(r["found_by"] == ["vector"] for r in vector)
    keyword = _search(client, text="invoice", mode="keyword")
    assert [r["path"].endswith("IMG_2024_invoice.png") for r in keyword] == [True]
    assert keyword[0]["found_by"] == ["keyword"]
    hybrid = _search(client, text="invoice", mode="hybrid", k=9, alpha=0.3, rrf_k=10)
    assert any("keyword" in r["found_by"] and r["path"].endswith("invoice.png") for r in hybrid)
    top = _search(client, text="whiteboard", mode="keyword")
    assert top[0]["id"] == 3 and top[0]["caption"] == "a whiteboard with notes"


def test_filters_offset_min_score_and_deduplicate(client):
    everything = _search(client, text="x", k=9)
    assert len(everything) == 9
    assert _search(client, text="x", k=3, offset=3) == everything[3:6]
    only = _search(client, text="x", k=9, filters={"path_glob": "*img[12].png", "extensions": ["png"]})
    assert sorted(Path(r["path"]).name for r in only) == ["img1.png", "img2.png"]
    assert _search(client, text="x", filters={"ids": [4], "kinds": ["image"]})[0]["id"] == 4
    assert _search(client, text="x", filters={"min_width": 33}) == []
    cut = everything[4]["score"]
    kept = _search(client, text="x", k=9, min_score=cut)
    assert kept == [r for r in everything if r["score"] >= cut] and len(kept) >= 5
    dedup = _search(client, text="x", k=9, deduplicate=True)
    names = [Path(r["path"]).name for r in dedup]
    assert len(dedup) == 8 and ("img0.png" in names) != ("IMG_2024_invoice.png" in names)


@pytest.mark.parametrize(
    "body",
    [
        {"image_id": 1, "mode": "keyword"},
        {"text": "a", "mode": "semantic"},
        {"text": "a", "alpha": 1.5},
        {"text": "a", "filters": {"colour": "red"}},
        {"text": "a", "filters": {"kinds": ["gif"]}},
        {"text": "a", "filters": {"extensions": ["../x"]}},
        {"text": "a", "filters": {"ids": []}},
        {"text": "a", "offset": -1},
        {"text": "a", "deduplicate": "yes"},
    ],
)
def test_bad_search_fields_are_422(client, body):
    r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    if body.get("mode") == "keyword":
        assert "keyword" in r.text and "text" in r.text


def test_duplicates_endpoint_pages_groups(client):
    r = client.get("/duplicates")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total_groups"] == 1 and len(body["groups"]) == 1
    names = {Path(x["path"]).name for x in body["groups"][0]["results"]}
    assert names == {"img0.png", "IMG_2024_invoice.png"}
    assert client.get("/duplicates", params={"offset": 1}).json()["groups"] == []
    assert client.get("/duplicates", params={"threshold": 2}).status_code == 422


def test_build_caption_pass_is_resumable(tmp_path):
    from index.builder import build_index as build

    root = tmp_path / "pics"
    make_images(root, n=5)
    enc = CaptioningEncoder()
    report = build([root], tmp_path / "ix", enc, workers=0, progress=False)
    assert (report.captioned, report.with_caption) == (0, 0) and enc.captioned == []
    report = build(
        [root], tmp_path / "ix", enc, workers=0, progress=False, caption=True, caption_batch_size=2
    )
    assert (report.captioned, report.with_caption) == (5, 5) and enc.captioned == [2, 2, 1]
    make_images(root / "more", n=2)
    report = build([root], tmp_path / "ix", enc, workers=0, progress=False, caption=True, caption_prompt="P:")
    assert (report.captioned, report.with_caption) == (2, 7) and enc.captioned[-1] == 2
    with Index.open(tmp_path / "ix") as idx:
        captions = [r["caption"] for r in idx.get(idx.ids())]
        assert sum(c.startswith("P: a picture 32x24") for c in captions) == 2
        assert idx.keyword_search("白板", 10) and len(idx.keyword_search("picture", 10)) == 7
    summary = report.summary()
    assert summary["captioned"] == 2 and summary["with_caption"] == 7
