"""Index types: factory choice, and flat / IVF / HNSW results against brute force (recall)."""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator

import faiss
import numpy as np
import pytest

from index import Index
from index import faiss_index as fx

DIM = 32


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    """One OpenMP thread (the machine is small and shared), restored after: OpenMP's setting is the calling
    thread's, and leaking it changes float reduction order in later tests' encoders."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, DIM)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data():
    x = clustered(6000)
    q = clustered(200, seed=1)
    x16 = x.astype(np.float16).astype(np.float32)  # what the index stores
    return x, q, brute_force(x16, q, 10)


@pytest.mark.parametrize(
    ("index_type", "factory_prefix", "min_recall"),
    [
        ("flat", "IDMap2,Flat", 1.0),
        ("ivf-flat", "IVF", 0.9),
        ("ivf-pq", "IVF", 0.9),
        ("hnsw", "IDMap2,HNSW", 0.9),
    ],
)
def test_search_agrees_with_brute_force(tmp_path, data, index_type, factory_prefix, min_recall):
    x, q, truth = data
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type=index_type)
    idx.add(x, [{"path": f"/x/{i}.jpg"} for i in range(len(x))])
    idx.save()
    idx.close()
    idx = Index.open(tmp_path / "ix")
    assert idx.manifest["faiss_factory"].startswith(factory_prefix)
    ids, scores, found = idx.search(q, 10)
    assert recall(ids, truth) >= min_recall
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    exact = np.einsum("qd,qkd->qk", q, x[ids].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(scores, exact, atol=1e-4)  # PQ candidates are re-scored exactly
    assert found[0][0]["path"] == f"/x/{ids[0, 0]}.jpg"


def test_hnsw_removal_is_filtered_then_rebuilt(tmp_path):
    x = clustered(2000)
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type="hnsw")
    idx.add(x, [{"path": f"/x/{i}.jpg"} for i in range(len(x))])
    idx.save()
    idx.remove([5, 6])
    assert 5 not in idx.search(x[5], 3)[0][0]
    idx.save(full=True)
    re = Index.open(tmp_path / "ix")
    assert re._faiss.ntotal == 1998 and 5 not in re.search(x[5], 3)[0][0]


def test_auto_switches_from_exact_to_ivf(tmp_path, monkeypatch):
    monkeypatch.setattr(fx, "AUTO_FLAT_MAX", 1000)
    x = clustered(3000)
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type="auto")
    idx.add(x[:800], [{"path": f"/x/{i}.jpg"} for i in range(800)])
    idx.save()
    assert idx.manifest["faiss_factory"] == "IDMap2,Flat"
    idx.add(x[800:], [{"path": f"/x/{i}.jpg"} for i in range(800, 3000)])
    idx.save()
    assert idx.manifest["faiss_factory"].startswith("IVF")
    assert idx.search(x[2500], 1)[0][0, 0] == 2500


def test_choose_factory():
    assert fx.choose_factory("flat", 10**7, 768) == "IDMap2,Flat"
    assert fx.choose_factory("auto", 50_000, 768) == "IDMap2,Flat"
    assert fx.choose_factory("auto", 1_000_000, 768, memory_budget=8 << 30).startswith("IVF")
    assert ",PQ" in fx.choose_factory("auto", 10_000_000, 768, memory_budget=4 << 30)
    assert fx.choose_factory("ivf-pq", 100, 768) == "IDMap2,Flat"  # too few vectors to train yet
    assert fx.choose_factory("ivf-pq", 1_000_000, 768) == "IVF2048,PQ96x8np"
    assert fx.choose_factory("hnsw", 10, 768).startswith("IDMap2,HNSW")
    with pytest.raises(ValueError, match="unknown index type"):
        fx.choose_factory("annoy", 10, 8)
    assert fx.gpu_count() >= 0


def test_rebuild_changes_type_without_reencoding(tmp_path):
    x = clustered(3000)
    idx = Index.create(tmp_path / "ix", DIM, model="m")
    idx.add(x, [{"path": f"/x/{i}.jpg"} for i in range(len(x))])
    idx.save()
    idx.rebuild("ivf-flat")
    assert idx.manifest["index_type"] == "ivf-flat" and idx.manifest["faiss_factory"].startswith("IVF")
    assert Index.open(tmp_path / "ix").search(x[:20], 1)[0][:, 0].tolist() == list(range(20))


def test_gpu_path_falls_back_to_cpu_with_same_results(tmp_path, monkeypatch, caplog):
    """A GPU that faiss reports but cannot use: training and search fall back to the CPU with a
    warning. The GPU calls are faked to fail, so this holds with faiss-cpu and faiss-gpu alike."""
    x = clustered(3000)
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type="ivf-flat")
    idx.add(x, [{"path": f"/x/{i}.jpg"} for i in range(len(x))])
    idx.save(full=True)
    cpu_ids, cpu_scores, _ = Index.open(tmp_path / "ix").search(x[:50], 5)

    def no_gpu(index, co=None, ngpu=-1):
        raise RuntimeError("fake: CUDA error 100 no CUDA-capable device is detected")

    monkeypatch.setattr(fx, "gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", no_gpu)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: types.SimpleNamespace(), raising=False)
    with caplog.at_level(logging.WARNING, logger="index.faiss_index"):
        idx.rebuild()  # GPU training path -> CPU fallback
        reader = Index.open(tmp_path / "ix")
        ids, scores, _ = reader.search(x[:50], 5)  # GPU search path -> CPU fallback
    assert reader._search_index is reader._faiss
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("training on CPU" in m and "no CUDA-capable device" in m for m in warned)
    assert any("searching on CPU" in m and "no CUDA-capable device" in m for m in warned)
    assert recall(ids, cpu_ids) >= 0.95 and np.allclose(scores[:, 0], cpu_scores[:, 0], atol=1e-5)


def test_pq_rerank_pool_is_a_search_knob(tmp_path, data):
    """The exact re-scoring pool of PQ indexes: a bigger pool never lowers recall; bad values are refused."""
    x, q, truth = data
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type="ivf-pq")
    idx.add(x, [{"path": f"/x/{i}.jpg"} for i in range(len(x))])
    idx.save()
    idx.set_search_params(rerank_factor=1)
    narrow = recall(idx.search(q, 10)[0], truth)
    idx.set_search_params(rerank_factor=100)
    wide = recall(idx.search(q, 10)[0], truth)
    assert wide >= narrow and wide >= 0.9
    with pytest.raises(ValueError, match="rerank_factor"):
        idx.set_search_params(rerank_factor=0)
