"""Metadata filters run inside the vector search: k results when k rows match, identical to brute force."""

from __future__ import annotations

import numpy as np
import pytest

from index import Index
from index import filters as filters_mod
from index import query as query_mod

N, DIM = 4000, 16


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows(n: int) -> list[dict]:
    return [
        {
            "root": "/lib",
            "relpath": f"{'rare' if i % 100 == 7 else 'common'}/f{i:05d}.{'png' if i % 10 == 3 else 'jpg'}",
            "width": 100 + i % 50,
            "height": 80,
            "mtime_ns": i * 1_000_000_000,
            "kind": "segment" if i % 200 == 1 else "image",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module", params=["flat", "ivf-flat", "ivf-pq", "hnsw"])
def built(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    idx = Index.create(folder, DIM, index_type=request.param)
    vecs = _vectors(N)
    idx.add(vecs[: N // 2], _rows(N)[: N // 2])
    idx.save(full=True)
    idx.add(vecs[N // 2 :], _rows(N)[N // 2 :])  # unsaved (pending) rows must be searched too
    yield idx, idx.get_vectors(np.arange(N))
    idx.close()


def _brute(stored: np.ndarray, q: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    ids = np.nonzero(keep)[0]
    sims = q @ stored[ids].T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


FILTERS = {
    "path_prefix": ({"path_prefix": "/lib/rare/"}, lambda i: i % 100 == 7),
    "relpath_prefix": ({"path_prefix": "rare/"}, lambda i: i % 100 == 7),
    "ids": ({"ids": list(range(5, N, 97))}, lambda i: (i - 5) % 97 == 0 and i >= 5),
    "glob+ext": (
        {"path_glob": "*/common/f01*", "extensions": [".PNG"]},
        lambda i: i % 10 == 3 and 1000 <= i < 2000,
    ),
    "kinds": ({"kinds": ["segment"]}, lambda i: i % 200 == 1),
    "size": ({"min_width": 148, "max_height": 80}, lambda i: i % 50 >= 48),
    "mtime": ({"mtime_from": 100, "mtime_to": 139.5}, lambda i: 100 <= i <= 139),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_selective_filter_returns_k_results_identical_to_brute_force(built, name):
    idx, stored = built
    filters, pred = FILTERS[name]
    keep = np.asarray([pred(i) for i in range(N)])
    assert 10 <= keep.sum() <= 0.06 * N  # ~1 % of the rows
    q = _vectors(5, seed=1)
    ids, scores, rows = idx.search(q, 10, filters=filters)
    assert ids.shape == (5, 10) and (ids >= 0).all()
    np.testing.assert_array_equal(ids, _brute(stored, q, keep, 10))
    assert all(keep[r["id"]] for per in rows for r in per)


def test_filter_keeping_fewer_than_k_rows_returns_them_all(built):
    idx, _ = built
    ids, _, rows = idx.search(_vectors(1, 3), 10, filters={"ids": [3, 17, 4_000_000]})
    assert sorted(ids[0].tolist()) == [3, 17] and len(rows[0]) == 2
    assert idx.search(_vectors(1, 3), 10, filters={"kinds": ["video"]})[0].shape == (1, 0)


@pytest.mark.parametrize("selector", ["bitmap", "batch"])
def test_large_filters_search_inside_faiss_with_recall(built, monkeypatch, selector):
    """Above EXACT_FILTER_MAX the selector goes into FAISS: exact on flat, high recall on IVF / HNSW."""
    idx, stored = built
    monkeypatch.setattr(query_mod, "EXACT_FILTER_MAX", 0)
    if selector == "batch":
        monkeypatch.setattr(filters_mod, "BITMAP_MAX_ID", 0)
    idx.__dict__.pop("_derived_cache", None)
    q = _vectors(50, seed=2)

    def recall_of(ids: np.ndarray, truth: np.ndarray) -> float:
        return float(
            np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist(), strict=True)])
        )

    unfiltered = recall_of(idx.search(q, 10)[0], _brute(stored, q, np.ones(N, bool), 10))
    for filters, pred in (FILTERS["path_prefix"], ({"path_glob": "*/common/*"}, lambda i: i % 100 != 7)):
        keep = np.asarray([pred(i) for i in range(N)])
        ids, _, _ = idx.search(q, 10, filters=filters)
        truth = _brute(stored, q, keep, 10)
        assert all(keep[i] for i in ids.ravel() if i >= 0)
        recall = recall_of(ids, truth)
        if idx.manifest["index_type"] == "flat":
            np.testing.assert_array_equal(ids, truth)
        else:
            # a filter independent of the vectors keeps the unfiltered search's recall (or improves it:
            # nprobe / efSearch are raised for selective filters)
            assert recall >= min(0.95, unfiltered - 0.03), (
                idx.manifest["index_type"],
                filters,
                recall,
                unfiltered,
            )


def test_unknown_filter_field_is_refused(built):
    idx, _ = built
    with pytest.raises(ValueError, match="unknown filter"):
        idx.search(_vectors(1), 3, filters={"colour": "red"})
    with pytest.raises(ValueError, match="unknown kinds"):
        idx.search(_vectors(1), 3, filters={"kinds": ["gif"]})


def test_id_selector_kinds(monkeypatch):
    from index.faiss_index import faiss

    ids = np.asarray([0, 9, 17, 1000], dtype=np.int64)
    sel = filters_mod.IdSelector(ids)
    assert isinstance(sel.sel, faiss.IDSelectorBitmap)
    assert [sel.sel.is_member(i) for i in (0, 1, 9, 17, 18, 999, 1000, 1001)] == [1, 0, 1, 1, 0, 0, 1, 0]
    monkeypatch.setattr(filters_mod, "BITMAP_MAX_ID", 100)
    batch = filters_mod.IdSelector(ids)
    assert isinstance(batch.sel, faiss.IDSelectorBatch)
    assert batch.sel.is_member(1000) and not batch.sel.is_member(8)


def test_cached_filters_see_added_and_removed_rows(tmp_path):
    idx = Index.create(tmp_path / "ix", DIM)
    vecs = _vectors(50)
    idx.add(vecs[:40], _rows(40))
    q = vecs[43]
    flt = {"extensions": ["png"]}
    before = idx.search(q, 10, filters=flt)[0][0].tolist()
    assert sorted(before) == [3, 13, 23, 33]
    idx.add(vecs[40:], _rows(50)[40:])  # unsaved: pending rows, in the same segment
    assert sorted(idx.search(q, 10, filters=flt)[0][0].tolist()) == [3, 13, 23, 33, 43]
    assert idx.search(q, 1, filters=flt)[0][0].tolist() == [43]  # the vector of row 43 is searched
    idx.save()
    idx.remove([13])
    assert sorted(idx.search(q, 10, filters=flt)[0][0].tolist()) == [3, 23, 33, 43]
    idx.close()


@pytest.mark.parametrize("exact_max", [0, 20_000])
def test_l2_metric_filtered_search(tmp_path, monkeypatch, exact_max):
    monkeypatch.setattr(query_mod, "EXACT_FILTER_MAX", exact_max)
    vecs = _vectors(500)
    with Index.create(tmp_path / "ix", DIM, metric="l2") as idx:
        idx.add(vecs, _rows(500))
        stored = idx.get_vectors(np.arange(500))
        q = _vectors(3, seed=4)
        ids, scores, _ = idx.search(q, 5, filters={"extensions": ["png"]})
        keep = np.nonzero(np.arange(500) % 10 == 3)[0]
        d = ((q[:, None, :] - stored[keep][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(ids, keep[np.argsort(d, axis=1)[:, :5]])
        np.testing.assert_allclose(scores, np.sort(d, axis=1)[:, :5], rtol=1e-4, atol=1e-5)
