"""GPU paths of the index on a CPU machine: faiss' GPU API is faked by CPU indexes (issue 18).

``FakeGpu`` stands in for ``faiss.index_cpu_to_all_gpus`` / ``GpuMultipleClonerOptions``: it records
the options, applies the limits faiss-gpu's ``GpuIndexIVFPQ::verifyPQSettings_`` checks (8-bit codes,
supported code sizes, lookup tables within the shared memory of a block) and returns a CPU copy.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator

import faiss
import numpy as np
import pytest

from index import Index, faiss_loader
from index import faiss_index as fx

DIM = 32
SMEM_PER_BLOCK = 49_152  # bytes of shared memory per block on every CUDA GPU faiss targets
#: code sizes faiss-gpu's IVFPQ supports (``IVFPQ::isSupportedPQCodeLength``)
GPU_CODE_BYTES = {1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96}


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    """One OpenMP thread (the machine is small and shared), restored after: OpenMP's setting is the calling
    thread's, and leaking it changes float reduction order in later tests' encoders."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


class FakeClonerOptions:
    """``faiss.GpuMultipleClonerOptions``' fields and defaults; unknown fields raise."""

    __slots__ = (
        "indicesOptions",
        "useFloat16CoarseQuantizer",
        "useFloat16",
        "usePrecomputed",
        "reserveVecs",
        "storeTransposed",
        "verbose",
        "use_cuvs",
        "allowCpuCoarseQuantizer",
        "shard",
        "shard_type",
        "common_ivf_quantizer",
    )

    def __init__(self) -> None:
        self.indicesOptions, self.reserveVecs, self.shard_type = 3, 0, 1
        self.useFloat16CoarseQuantizer = self.useFloat16 = self.usePrecomputed = False
        self.storeTransposed = self.verbose = self.use_cuvs = self.allowCpuCoarseQuantizer = False
        self.shard = self.common_ivf_quantizer = False


class FakeGpu:
    """Records every copy to the "GPU"; ``fail`` makes every copy raise like faiss-gpu would."""

    def __init__(self, smem: int = SMEM_PER_BLOCK, fail: str | None = None, clustering_wrapper=None) -> None:
        self.smem, self.fail, self.clustering_wrapper = smem, fail, clustering_wrapper
        self.copies: list[tuple[faiss.Index, FakeClonerOptions, faiss.Index]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
        monkeypatch.setattr(fx, "gpu_count", lambda: 1)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeClonerOptions, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self.index_cpu_to_all_gpus)
        return self

    def index_cpu_to_all_gpus(self, index: faiss.Index, co: FakeClonerOptions | None = None, ngpu: int = -1):
        if self.fail:
            raise RuntimeError(self.fail)
        co = co if co is not None else FakeClonerOptions()
        try:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        except RuntimeError:
            ivf = None
        if isinstance(ivf, faiss.IndexIVFPQ):
            m, nbits = ivf.pq.M, ivf.pq.nbits
            if nbits != 8:
                raise RuntimeError(f"Bits per code must be 8 (passed {nbits})")
            if m not in GPU_CODE_BYTES:
                raise RuntimeError(
                    f"Number of bytes per encoded vector / sub-quantizers ({m}) is not supported"
                )
            need = (2 if co.useFloat16 else 4) * m * 2**nbits
            if need > self.smem:
                raise RuntimeError(
                    f"Device 0 has {self.smem} bytes of shared memory, while {nbits} bits per code and {m} "
                    f"sub-quantizers requires {need} bytes. Consider useFloat16LookupTables"
                )
        if isinstance(index, faiss.IndexFlat) and self.clustering_wrapper is not None:
            copy = self.clustering_wrapper(index)
        else:
            copy = faiss.clone_index(index)
        self.copies.append((index, co, copy))
        return copy


def clustered(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, dim)).astype(np.float32)
    x = centers[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(start: int, n: int) -> list[dict]:
    return [{"path": f"/x/{i}.jpg"} for i in range(start, start + n)]


# ------------------------------------------------------------------ defect 2: which faiss is loaded
class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


def fake_distributions(*names: str):
    dists = [FakeDist(n, "1.12.0") for n in names] + [FakeDist("numpy", "2.1.0")]
    return lambda: iter(dists)


def test_missing_faiss_names_the_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(ImportError, match=r"internvl-retrieval\[cpu\].*internvl-retrieval\[gpu\]"):
        faiss_loader.import_faiss.__wrapped__()


def test_index_modules_load_faiss_through_the_check():
    assert fx.faiss is faiss_loader.import_faiss() is faiss


@pytest.mark.parametrize(
    ("module", "build", "ngpu"),
    [
        (types.SimpleNamespace(get_num_gpus=lambda: 0), "CPU", 0),
        (types.SimpleNamespace(get_num_gpus=lambda: 2, StandardGpuResources=object), "GPU", 2),
    ],
)
def test_both_builds_installed_warns_which_one_is_loaded(monkeypatch, caplog, module, build, ngpu):
    monkeypatch.setattr(
        faiss_loader.metadata, "distributions", fake_distributions("faiss-cpu", "faiss_gpu_cu12")
    )
    with caplog.at_level(logging.WARNING, logger="index.faiss_loader"):
        message = faiss_loader.check_single_build(module)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [message]
    assert "faiss-cpu 1.12.0" in message and "faiss-gpu-cu12 1.12.0" in message
    assert f"loaded the {build} build" in message and f"faiss.get_num_gpus() = {ngpu}" in message
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12" in message and "internvl-retrieval[" in message


def test_import_warns_on_the_real_module_when_both_are_installed(monkeypatch, caplog):
    monkeypatch.setattr(faiss_loader.metadata, "distributions", fake_distributions("faiss-cpu", "faiss-gpu"))
    with caplog.at_level(logging.WARNING, logger="index.faiss_loader"):
        assert faiss_loader.import_faiss.__wrapped__() is faiss
    expected = "GPU" if hasattr(faiss, "StandardGpuResources") else "CPU"
    assert any(f"loaded the {expected} build" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("names", [("faiss-cpu",), ("faiss-gpu-cu12",), ()])
def test_one_build_installed_is_silent(monkeypatch, caplog, names):
    monkeypatch.setattr(faiss_loader.metadata, "distributions", fake_distributions(*names))
    with caplog.at_level(logging.DEBUG, logger="index.faiss_loader"):
        assert faiss_loader.check_single_build(faiss) is None
    assert not caplog.records


# ---------------------------------------------------------------- defect 3: IVF-PQ reaches the GPU
def test_ivfpq_copy_uses_float16_lookup_tables(monkeypatch):
    """PQ96x8 at 768 dimensions: 98,304 B of float32 lookup tables, 49,152 B in float16."""
    gpu = FakeGpu().install(monkeypatch)
    cpu = faiss.index_factory(768, "IVF64,PQ96x8np", faiss.METRIC_INNER_PRODUCT)
    on_gpu = fx.to_search_device(cpu)
    assert on_gpu is not cpu and len(gpu.copies) == 1
    co = gpu.copies[0][1]
    assert co.useFloat16 is True  # -> GpuIndexIVFPQConfig.useFloat16LookupTables
    assert co.shard is False and co.useFloat16CoarseQuantizer is False


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF64,Flat"])
def test_exact_codes_are_copied_without_float16(monkeypatch, factory):
    gpu = FakeGpu().install(monkeypatch)
    cpu = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    assert fx.to_search_device(cpu) is not cpu
    assert gpu.copies[0][1].useFloat16 is False  # float16 storage would change flat scores


def test_failed_gpu_copy_is_a_warning_with_the_reason(monkeypatch, caplog):
    FakeGpu(fail="fake: out of memory on device 0").install(monkeypatch)
    cpu = faiss.index_factory(DIM, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    with caplog.at_level(logging.INFO, logger="index.faiss_index"):
        assert fx.to_search_device(cpu) is cpu
    assert [(r.levelno, "out of memory on device 0" in r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, True)
    ]


def test_hnsw_stays_on_cpu_without_a_warning(monkeypatch, caplog):
    gpu = FakeGpu().install(monkeypatch)
    cpu = faiss.index_factory(DIM, "IDMap2,HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    with caplog.at_level(logging.WARNING):
        assert fx.to_search_device(cpu) is cpu
    assert not gpu.copies and not caplog.records


def test_pq_codes_are_8_bit_and_gpu_sized_with_a_gpu(monkeypatch):
    assert fx.choose_factory("ivf-pq", 5000, 768, gpu=False) == "IVF128,PQ96x6np"
    assert fx.choose_factory("ivf-pq", 5000, 768, gpu=True) == "IVF128,PQ96x8np"
    assert fx.choose_factory("ivf-pq", 1000, 768, gpu=True) == "IVF16,PQ96x8np"
    assert fx.choose_factory("ivf-pq", 10**6, 640, gpu=False) == "IVF2048,PQ80x8np"
    assert fx.choose_factory("ivf-pq", 10**6, 640, gpu=True) == "IVF2048,PQ64x8np"  # 80 B: no GPU kernel
    assert fx.choose_factory("ivf-pq", 10**6, 3200, gpu=True) == "IVF2048,PQ64x8np"
    monkeypatch.setattr(fx, "gpu_count", lambda: 1)
    assert fx.choose_factory("ivf-pq", 5000, 768) == "IVF128,PQ96x8np"  # default: what faiss sees
    monkeypatch.setattr(fx, "gpu_count", lambda: 0)
    assert fx.choose_factory("ivf-pq", 5000, 768) == "IVF128,PQ96x6np"


def test_ivfpq_index_searches_on_the_gpu_copy(tmp_path, monkeypatch):
    """End to end: an IVF-PQ index built and searched with a (fake) GPU whose shared memory holds the
    float16 lookup tables of PQ8x8 (4 KiB) but not the float32 ones (8 KiB)."""
    x = clustered(3000)
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type="ivf-pq")
    idx.add(x, rows(0, len(x)))
    gpu = FakeGpu(smem=6144).install(monkeypatch)
    idx.save()
    assert idx.manifest["faiss_factory"] == "IVF64,PQ8x8np"
    ids, scores, _ = idx.search(x[:20], 5)
    assert idx._search_index is not idx._faiss and gpu.copies[-1][1].useFloat16 is True
    assert ids[:, 0].tolist() == list(range(20))  # candidates re-scored exactly: each finds itself
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)  # float16-stored unit vectors


# ---------------------------------------------------------- defect 6: GPU k-means: metric, release
@pytest.mark.parametrize(
    ("metric", "faiss_metric"), [("ip", faiss.METRIC_INNER_PRODUCT), ("l2", faiss.METRIC_L2)]
)
def test_gpu_kmeans_uses_the_index_metric_and_releases_its_index(monkeypatch, metric, faiss_metric):
    gpu = FakeGpu().install(monkeypatch)
    x = clustered(2000)
    index = fx.new_index("IVF16,Flat", DIM, metric, x)
    assert index.is_trained and len(gpu.copies) == 1
    source, _, clustering = gpu.copies[0]
    assert source.metric_type == clustering.metric_type == faiss_metric  # the CPU path's metric
    assert clustering.ntotal == 16  # k-means ran on it: it holds the final centroids
    assert faiss.extract_index_ivf(index).clustering_index is None  # no dangling pointer
    assert clustering.thisown  # Python owns it again: freed with the last reference ...
    assert sys.getrefcount(clustering) == 3  # ... which is this test's (the list and the argument)


def test_gpu_kmeans_matches_cpu_kmeans(monkeypatch):
    """Same data, seed and metric: the GPU clustering index finds the CPU path's centroids (a guard: for
    ``ip`` faiss runs spherical k-means, whose unit-norm centroids L2 and IP assign alike)."""
    x = clustered(2000) * np.random.default_rng(1).uniform(0.5, 2.0, (2000, 1)).astype(np.float32)
    on_cpu = fx.new_index("IVF16,Flat", DIM, "ip", x)
    FakeGpu().install(monkeypatch)
    on_gpu = fx.new_index("IVF16,Flat", DIM, "ip", x)
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 16) for i in (on_gpu, on_cpu)]
    np.testing.assert_allclose(*centroids, atol=1e-5)


def refusing_add(flat: faiss.Index) -> faiss.Index:
    """A clustering index whose ``add`` raises a C++ error mid-training (as faiss-gpu when out of memory):
    ``IndexIDMap2`` only takes ``add_with_ids``."""
    return faiss.IndexIDMap2(faiss.clone_index(flat))


def test_failed_gpu_kmeans_retrains_on_cpu_with_a_warning(monkeypatch, caplog):
    gpu = FakeGpu(clustering_wrapper=refusing_add).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="index.faiss_index"):
        index = fx.new_index("IVF16,Flat", DIM, "ip", clustered(2000))
    assert index.is_trained and faiss.extract_index_ivf(index).quantizer.ntotal == 16
    assert faiss.extract_index_ivf(index).clustering_index is None and gpu.copies[0][2].thisown
    assert any("GPU k-means failed, training on CPU" in r.getMessage() for r in caplog.records)


# ------------------------------------------------- defect 11: the GPU copy follows adds and removals
@pytest.mark.parametrize(("index_type", "n0"), [("flat", 200), ("ivf-flat", 3000)])
def test_add_updates_the_gpu_copy_instead_of_copying_again(tmp_path, monkeypatch, index_type, n0):
    x = clustered(n0 + 60)
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type=index_type)
    idx.add(x[:n0], rows(0, n0))
    idx.save()
    gpu = FakeGpu().install(monkeypatch)
    assert idx.search(x[:3], 1)[0][:, 0].tolist() == [0, 1, 2]
    assert len(gpu.copies) == 1
    copy = idx._search_index
    idx.add(x[n0 : n0 + 30], rows(n0, 30))
    idx.add(x[n0 + 30 :], rows(n0 + 30, 30))
    assert idx._search_index is copy and copy.ntotal == idx._faiss.ntotal == n0 + 60
    new = [n0, n0 + 29, n0 + 59]
    assert idx.search(x[new], 1)[0][:, 0].tolist() == new  # found on the copy, not re-copied
    idx.save()
    assert idx.search(x[new], 1)[0][:, 0].tolist() == new
    assert len(gpu.copies) == 1


def test_removal_copies_the_index_again(tmp_path, monkeypatch):
    """faiss-gpu cannot remove ids: the copy is dropped on removal and made again by the next search."""
    x = clustered(200)
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type="flat")
    idx.add(x, rows(0, 200))
    gpu = FakeGpu().install(monkeypatch)
    idx.search(x[:1], 1)
    idx.remove([5, 6])
    assert idx._search_index is None
    ids = idx.search(x[5:7], 3)[0]
    assert 5 not in ids and 6 not in ids
    assert len(gpu.copies) == 2 and idx._search_index.ntotal == idx._faiss.ntotal == 198


class FullGpuCopy:
    """A GPU copy whose memory is exhausted: adding raises as faiss-gpu does."""

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        raise RuntimeError("fake: cudaMalloc error 2 out of memory")


def test_failed_add_to_the_gpu_copy_falls_back_to_a_new_copy(tmp_path, monkeypatch, caplog):
    x = clustered(100)
    idx = Index.create(tmp_path / "ix", DIM, model="m", index_type="flat")
    idx.add(x[:50], rows(0, 50))
    gpu = FakeGpu().install(monkeypatch)
    idx._search_index = FullGpuCopy()
    with caplog.at_level(logging.WARNING, logger="index.index"):
        idx.add(x[50:], rows(50, 50))
    assert idx._search_index is None
    assert any(
        "cannot add 50 vectors to the GPU copy" in r.getMessage() and "out of memory" in r.getMessage()
        for r in caplog.records
    )
    assert idx.search(x[99], 1)[0][0, 0] == 99 and len(gpu.copies) == 1
