"""Index unit tests on synthetic vectors: API contract, persistence, snapshots, errors, locking."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from index import Index, IndexFormatError, IndexLockedError, IndexMismatchError

DIM = 16


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"path": f"/photos/a/img{i}.jpg", "size": i, "width": 10, "height": 20}
        for i in range(start, start + n)
    ]


def test_add_search_get_roundtrip(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM, model="m", mode="internvl-c")
    x = unit(50)
    ids = idx.add(x, rows(50))
    assert ids.tolist() == list(range(50)) and len(idx) == 50
    q_ids, scores, q_rows = idx.search(x[:5], 3)
    assert q_ids.shape == scores.shape == (5, 3) and q_ids.dtype == np.int64
    assert q_ids[:, 0].tolist() == ids[:5].tolist()
    assert np.allclose(scores[:, 0], 1.0, atol=2e-3)  # float16 storage
    top = q_rows[2][0]
    assert (
        top["id"] == 2 and top["path"] == "/photos/a/img2.jpg" and top["score"] == pytest.approx(scores[2, 0])
    )
    assert top["width"] == 10 and top["size"] == 2
    assert idx.get([2**70, -1]) == [None, None]  # out-of-range ids are simply unknown
    got = idx.get([3, 999, 0])
    assert got[0]["path"] == "/photos/a/img3.jpg" and got[1] is None and got[2]["id"] == 0
    vec = idx.get_vectors([4, 1])
    assert vec.dtype == np.float32 and vec.shape == (2, DIM)
    np.testing.assert_allclose(vec, x[[4, 1]], atol=1e-3)
    with pytest.raises(KeyError):
        idx.get_vectors([12345])


def test_persistence_and_manifest(tmp_path):
    folder = tmp_path / "ix"
    idx = Index.create(folder, DIM, model="m", mode="internvl-g", index_type="flat")
    x = unit(30)
    idx.add(x, [{**r, "caption": "extra field"} for r in rows(30)])
    idx.save()
    idx.remove([0, 1, 2])
    idx.save()
    idx.close()
    re = Index.open(folder)
    m = re.manifest
    assert (m["format_version"], m["model"], m["mode"], m["embed_dim"], m["metric"], m["index_type"]) == (
        1,
        "m",
        "internvl-g",
        DIM,
        "ip",
        "flat",
    )
    assert m["count"] == len(re) == 27 and re.dir == folder.absolute()
    assert json.loads((folder / "manifest.json").read_text())["generation"] == m["generation"]
    assert re.get([0])[0] is None and re.get([5])[0]["caption"] == "extra field"
    ids, _, _ = re.search(x[3:10], 1)
    assert ids[:, 0].tolist() == list(range(3, 10))
    assert re.search(x[0], 1)[0][0, 0] != 0


def test_unsaved_changes_are_dropped_on_reopen(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM, model="m")
    idx.add(unit(10), rows(10))
    idx.save()
    idx.add(unit(5, seed=1), rows(5, start=10))
    idx.remove([0])
    assert len(idx) == 14
    idx.close()
    re = Index.open(tmp_path / "ix")
    assert len(re) == 10 and re.get([0])[0] is not None and re.get([10])[0] is None
    re.lock_for_writing()  # rolls the uncommitted rows back for good
    assert sorted(re.ids().tolist()) == list(range(10))
    new = re.add(unit(1, seed=2), rows(1, start=10))
    assert new[0] >= 15  # ids of rolled-back rows are never handed out again


def test_reader_snapshot_is_stable_while_writer_saves(tmp_path):
    w = Index.create(tmp_path / "ix", DIM, model="m")
    x = unit(40)
    w.add(x[:20], rows(20))
    w.save()
    r = Index.open(tmp_path / "ix")
    w.add(x[20:], rows(20, start=20))
    w.remove([0])
    w.save()
    assert len(r) == 20 and r.get([0])[0] is not None and r.get([25])[0] is None
    assert set(r.search(x, 5)[0].ravel().tolist()) <= set(range(20))
    r2 = Index.open(tmp_path / "ix")
    assert len(r2) == 39 and r2.search(x[25], 1)[0][0, 0] == 25


def test_update_same_path_needs_remove_first(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM, model="m")
    idx.add(unit(3), rows(3))
    with pytest.raises(ValueError, match="already indexed"):
        idx.add(unit(1), rows(1))
    idx.remove([0])
    new = idx.add(unit(1, seed=5), rows(1))
    assert idx.get(new)[0]["path"] == "/photos/a/img0.jpg" and len(idx) == 3


def test_bad_inputs_raise_clear_errors(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM, model="m")
    with pytest.raises(ValueError, match="shape"):
        idx.add(np.zeros((2, DIM + 1)), rows(2))
    with pytest.raises(ValueError, match="rows"):
        idx.add(unit(2), rows(3))
    with pytest.raises(ValueError, match="NaN"):
        idx.add(np.full((1, DIM), np.nan), rows(1))
    with pytest.raises(ValueError, match="float16"):
        idx.add(np.full((1, DIM), 1e6), rows(1))
    with pytest.raises(ValueError, match="JSON"):
        idx.add(unit(1), [{"path": "/x.jpg", "blob": object()}])
    assert len(idx) == 0
    idx.add(unit(1), [{"path": "/np.jpg", "size": np.int64(5), "width": np.int32(3)}])
    assert idx.get([idx.ids()[0]])[0]["size"] == 5
    idx.remove(idx.ids())
    idx.add(unit(4), rows(4))
    with pytest.raises(ValueError, match="shape"):
        idx.search(np.zeros((1, DIM - 1)), 2)
    with pytest.raises(ValueError, match="k must be"):
        idx.search(unit(1), 0)
    ids, scores, found = idx.search(unit(2), 10)  # k larger than the index
    assert ids.shape == (2, 4) and len(found[0]) == 4
    with pytest.raises(ValueError, match="unknown metric"):
        Index.create(tmp_path / "other", DIM, metric="cosine")
    with pytest.raises(ValueError, match="unknown index type"):
        Index.create(tmp_path / "other", DIM, index_type="lsh")
    with pytest.raises(FileExistsError):
        Index.create(tmp_path / "ix", DIM)


def test_empty_index_search(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM, model="m")
    ids, scores, found = idx.search(unit(3), 5)
    assert ids.shape == (3, 0) and found == [[], [], []]


def test_open_rejects_other_model_dim_and_format(tmp_path):
    folder = tmp_path / "ix"
    Index.create(folder, DIM, model="model-a", mode="internvl-c").close()
    with pytest.raises(IndexMismatchError, match="model-a"):
        Index.open(folder, model="model-b")
    with pytest.raises(IndexMismatchError, match="dim"):
        Index.open(folder, dim=DIM * 2)
    with pytest.raises(IndexMismatchError, match="mode"):
        Index.open(folder, mode="internvl-g")
    Index.open(folder, model="model-a", dim=DIM, mode="internvl-c").close()
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="version 99"):
        Index.open(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError):
        Index.open(folder)
    with pytest.raises(FileNotFoundError, match="no index"):
        Index.open(tmp_path / "nothing")


def test_second_writer_is_refused(tmp_path):
    a = Index.create(tmp_path / "ix", DIM, model="m")
    b = Index.open(tmp_path / "ix")
    assert len(b) == 0  # reading is fine
    with pytest.raises(IndexLockedError):
        b.add(unit(1), rows(1))
    a.close()
    b.add(unit(1), rows(1))
    b.save()


def test_concurrent_searches_agree(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM, model="m")
    x = unit(500)
    idx.add(x, rows(500))
    idx.save()
    reader = Index.open(tmp_path / "ix")
    expected = reader.search(x[:50], 5)[0]
    results, errors = [], []

    def work() -> None:
        try:
            for _ in range(5):
                ids, _, found = reader.search(x[:50], 5)
                results.append(np.array_equal(ids, expected) and all(len(f) == 5 for f in found))
                reader.get(ids[:, 0].tolist())
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20 and all(results)


def test_many_saves_keep_segments_few_and_vectors_intact(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM, model="m")
    x = unit(600)
    for i in range(30):
        idx.add(x[i * 20 : (i + 1) * 20], rows(20, start=i * 20))
        if i % 4 == 3:
            idx.remove([i * 20])
        idx.save()
    segs = list((tmp_path / "ix" / "vectors").glob("seg-*.npy"))
    assert len(segs) <= 8, segs  # merged LSM-style, not one file per save
    assert len(list((tmp_path / "ix" / "faiss").iterdir())) <= 2
    live = idx.ids()
    assert len(live) == len(idx) == 600 - 7
    np.testing.assert_allclose(idx.get_vectors(live), x[live], atol=1e-3)
    re = Index.open(tmp_path / "ix")
    assert re.search(x[live], 1)[0][:, 0].tolist() == live.tolist()
