"""Near-duplicates on the demo model: planted resized / re-encoded / 5 %-cropped copies are grouped with
precision and recall >= 0.95, distinct images are not; /search-style collapsing keeps the best copy."""

from __future__ import annotations

import io
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import Index
from index.duplicates import DEFAULT_THRESHOLD, collapse, find_duplicates

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _copies(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=60)
    dx, dy = round(w * 0.05), round(h * 0.05)
    return [
        image.resize((w // 2, h // 2), Image.BICUBIC),
        Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
        image.crop((dx, dy, w - dx, h - dy)),
    ]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    sys.path.insert(0, str(SCRIPTS))
    import generate_shapes as gs

    from retrieval import load_encoder

    out = tmp_path_factory.mktemp("shapes")
    rows = gs.generate(out, 200, seed=7)
    picked, seen = [], set()
    for row in rows:  # distinct pictures: one per shape x colour
        if (row["shape"], row["colour"]) not in seen:
            seen.add((row["shape"], row["colour"]))
            picked.append(row)
    originals = [Image.open(out / r["file"]).convert("RGB") for r in picked]
    planted_for = range(0, len(originals), 2)  # every other original gets three copies
    images, labels = list(originals), list(range(len(originals)))
    for i in planted_for:
        images += _copies(originals[i])
        labels += [i] * 3
    vectors = load_encoder("demo", device="cpu").encode_images(images)
    idx = Index.create(tmp_path_factory.mktemp("dup_index"), vectors.shape[1])
    rows = [
        {"path": f"/shapes/{n:04d}.png", "width": im.width, "height": im.height, "size": 100_000 - n}
        for n, im in enumerate(images)
    ]
    idx.add(vectors, rows)
    idx.save()
    yield idx, np.asarray(labels)
    idx.close()


def _pairs(groups: list[list[int]]) -> set[tuple[int, int]]:
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}


def test_planted_duplicates_grouped_with_precision_and_recall(planted):
    idx, labels = planted
    groups = find_duplicates(idx, DEFAULT_THRESHOLD)
    predicted = _pairs([[r["id"] for r in g] for g in groups])
    truth = _pairs([np.nonzero(labels == lab)[0].tolist() for lab in np.unique(labels)])
    hits = len(predicted & truth)
    precision, recall = hits / max(len(predicted), 1), hits / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    originals_grouped = [g for g in groups if len({labels[r["id"]] for r in g}) > 1]
    assert len(originals_grouped) <= 1  # distinct pictures are (almost) never merged
    for g in groups:  # best copy first: the original (largest resolution)
        areas = [r["width"] * r["height"] for r in g]
        assert areas == sorted(areas, reverse=True)


def test_collapse_keeps_the_best_copy_at_the_first_members_rank(planted):
    idx, labels = planted
    original = 0
    members = np.nonzero(labels == original)[0]
    half_size = int(members[1])  # the resized copy
    _, _, rows = idx.search(idx.get_vectors([half_size]), 10)
    ranked = rows[0]
    assert ranked[0]["id"] == half_size
    collapsed = collapse(idx, ranked, DEFAULT_THRESHOLD)
    assert collapsed[0]["id"] == original and collapsed[0]["score"] == ranked[0]["score"]
    assert not {int(m) for m in members[1:]} & {r["id"] for r in collapsed}
    assert len({labels[r["id"]] for r in collapsed}) == len(collapsed)


@pytest.mark.parametrize("index_type", ["flat", "ivf-flat", "ivf-pq", "hnsw"])
def test_duplicates_on_every_index_type(tmp_path, index_type):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3000, 16)).astype(np.float32)
    v[2999], v[2998] = v[5] + 0.01, v[7]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    with Index.create(tmp_path / "ix", 16, index_type=index_type) as idx:
        idx.add(v, [{"path": f"/a/{i}.jpg", "width": 10, "height": 10, "size": i} for i in range(3000)])
        idx.save(full=True)
        assert idx.manifest["faiss_factory"] != "IDMap2,Flat" or index_type == "flat"
        groups = [[r["id"] for r in g] for g in find_duplicates(idx, 0.98)]
        assert groups == [[2998, 7], [2999, 5]]  # same size groups by best copy id; larger file first
        idx.remove([2998])  # removed rows (HNSW: dead ids still in FAISS) are not grouped
        assert [[r["id"] for r in g] for g in find_duplicates(idx, 0.98)] == [[2999, 5]]
