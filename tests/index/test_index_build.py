"""build_index acceptance on generated folders with the 56-px InternVL fixture model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import TEST_MAX_PIXELS, make_bad_files, make_image, make_images

from index import Index, IndexMismatchError
from index.builder import REPORT_FILE, SKIPPED_FILE, build_index
from retrieval.images import open_image


def build(folders, index_dir, encoder, **kw):
    kw = {"workers": 2, "batch_size": 16, "max_pixels": TEST_MAX_PIXELS, "progress": False, **kw}
    return build_index([str(f) for f in folders], index_dir, encoder, **kw)


def indexed_paths(index_dir) -> list[str]:
    idx = Index.open(index_dir)
    paths = [r["path"] for r in idx.get(idx.ids().tolist())]
    idx.close()
    return paths


def test_build_lifecycle(tmp_path, encoder):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    images = make_images(photos, 200)
    bad = make_bad_files(photos / "broken")

    # 1. 200 good + 10 bad files: 200 indexed, 10 reported with their reasons
    first = build([photos], index_dir, encoder)
    assert (first.scanned, first.added, first.updated, first.removed, first.skipped) == (210, 200, 0, 0, 10)
    assert first.encoded == 200 and first.indexed == 200
    report = json.loads((index_dir / REPORT_FILE).read_text())
    reasons = {os.path.basename(f["path"]): f["reason"] for f in report["skipped_files"]}
    assert reasons == bad
    tsv = (index_dir / SKIPPED_FILE).read_text().splitlines()
    assert tsv[0] == "path\treason\tmessage" and len(tsv) == 11
    assert sorted(indexed_paths(index_dir)) == sorted(str(p) for p in images)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["model"] == encoder.name and manifest["embed_dim"] == encoder.embed_dim
    assert manifest["faiss_factory"] == "IDMap2,Flat"  # exact while small

    # every indexed image's own embedding (encoded on its own, outside the build) retrieves it at rank 1
    idx = Index.open(index_dir)
    queries = encoder.encode_images([open_image(p) for p in images])
    ids, _, found = idx.search(queries, 1)
    assert [f[0]["path"] for f in found] == [str(p) for p in images]
    np.testing.assert_allclose(idx.get_vectors(ids[:, 0]), queries, atol=2e-3)  # stored = image embeddings
    idx.close()

    # 2. second run: nothing added, nothing encoded, bad files still reported
    second = build([photos], index_dir, encoder)
    assert (second.added, second.updated, second.encoded, second.unchanged, second.skipped) == (
        0,
        0,
        0,
        200,
        10,
    )

    # 3. add 5, delete 3: +5; the deleted rows stay until --prune
    new = make_images(photos / "new", 5, start=1000)
    for p in images[:3]:
        p.unlink()
    third = build([photos], index_dir, encoder)
    assert (third.added, third.removed, third.encoded, third.indexed) == (5, 0, 5, 205)
    fourth = build([photos], index_dir, encoder, prune=True)
    assert (fourth.added, fourth.removed, fourth.encoded, fourth.indexed) == (0, 3, 0, 202)
    assert sorted(indexed_paths(index_dir)) == sorted(str(p) for p in images[3:] + new)

    # 4. a changed file is re-embedded in place; a touched but identical file is not re-encoded
    changed, touched = images[10], images[11]
    make_image(changed, seed=4242)
    os.utime(touched, ns=(1_000_000_000, 1_000_000_000))
    fifth = build([photos], index_dir, encoder)
    assert (fifth.added, fifth.updated, fifth.encoded, fifth.indexed) == (0, 1, 1, 202)
    sixth = build([photos], index_dir, encoder)
    assert sixth.encoded == 0 and sixth.unchanged == 202
    idx = Index.open(index_dir)
    query = encoder.encode_images([open_image(changed)])
    _, _, found = idx.search(query, 1)
    assert found[0][0]["path"] == str(changed) and found[0][0]["score"] == pytest.approx(1.0, abs=5e-3)
    paths = [r["path"] for r in idx.get(idx.ids().tolist())]
    assert len(paths) == len(set(paths)) == 202


def test_other_model_is_refused(tmp_path, encoder):
    Index.create(tmp_path / "index", encoder.embed_dim, model="some-other-model", mode=encoder.mode).close()
    make_images(tmp_path / "photos", 2)
    with pytest.raises(IndexMismatchError, match="some-other-model"):
        build([tmp_path / "photos"], tmp_path / "index", encoder)


def test_symlinks_outside_roots_are_not_followed(tmp_path, encoder):
    photos, outside = tmp_path / "photos", tmp_path / "outside"
    inside = make_images(photos, 3)
    extra = make_images(outside, 4, start=50)
    (photos / "link_out").symlink_to(outside, target_is_directory=True)
    (photos / "file_out.png").symlink_to(extra[0])
    (photos / "a_link_in").symlink_to(photos / "d1", target_is_directory=True)  # same folder twice
    (photos / "loop").symlink_to(photos, target_is_directory=True)
    report = build([photos], tmp_path / "index", encoder, workers=0)
    paths = indexed_paths(tmp_path / "index")
    assert report.skipped == 0 and len(paths) == 3
    assert {os.path.basename(p) for p in paths} == {p.name for p in inside}
    assert not any("link_out" in p or "file_out" in p or "/loop/" in p for p in paths)
    # with the outside folder as a second root the links point inside the roots; still no duplicates
    build([photos, outside], tmp_path / "index2", encoder, workers=0)
    paths = indexed_paths(tmp_path / "index2")
    assert sorted(os.path.basename(p) for p in paths if "file_out" not in p) == sorted(
        p.name for p in inside + extra
    )
    assert len({os.path.realpath(p) for p in paths}) == 7


def test_missing_folder_is_a_clear_error(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        build([tmp_path / "nope"], tmp_path / "index", encoder)


def test_ctrl_c_commits_what_was_encoded(tmp_path, encoder, monkeypatch):
    photos = tmp_path / "photos"
    images = make_images(photos, 24)
    real, calls = encoder.encode_pixels, []

    def interrupted(pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(pixels)

    monkeypatch.setattr(encoder, "encode_pixels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build([photos], tmp_path / "index", encoder, batch_size=4, commit_every=100, workers=0)
    assert len(indexed_paths(tmp_path / "index")) == 8  # the two batches encoded before Ctrl-C
    monkeypatch.undo()
    again = build([photos], tmp_path / "index", encoder, batch_size=4, workers=0)
    assert (again.added, again.unchanged, again.indexed) == (16, 8, 24)
    assert sorted(indexed_paths(tmp_path / "index")) == sorted(str(p) for p in images)


def test_changing_index_type_reuses_stored_vectors(tmp_path, encoder, monkeypatch):
    photos = tmp_path / "photos"
    make_images(photos, 12)
    build([photos], tmp_path / "index", encoder, index_type="hnsw", workers=0)
    assert Index.open(tmp_path / "index").manifest["faiss_factory"].startswith("IDMap2,HNSW")
    monkeypatch.setattr(encoder, "encode_pixels", lambda px: pytest.fail("re-encoded"))
    report = build([photos], tmp_path / "index", encoder, index_type="flat", workers=0)
    manifest = Index.open(tmp_path / "index").manifest
    assert report.encoded == 0 and (manifest["index_type"], manifest["faiss_factory"]) == (
        "flat",
        "IDMap2,Flat",
    )
