"""FAISS side of the index: factory strings, the ``auto`` choice, training on a sample, GPU use.

Every index keeps FAISS ids equal to SQLite row ids: ``IDMap2`` wraps flat and HNSW indexes, IVF
indexes take ids natively. GPUs (``faiss.get_num_gpus() > 0``, i.e. faiss-gpu) are used for
k-means training and for search; without them everything runs on CPU with the same results
within floating-point tolerance. With a GPU, IVF-PQ uses 8-bit codes with a GPU-supported code
size and is copied with float16 lookup tables (float32 tables of ``PQ96x8`` need 96 KiB of shared
memory per block, twice what GPUs offer); HNSW has no GPU version and stays on the CPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from index.faiss_loader import import_faiss
from index.vectors import atomic_write

faiss = import_faiss()

logger = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "ivf-flat", "ivf-pq", "hnsw")
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FLAT = "IDMap2,Flat"
#: ``auto`` stays exact up to this many vectors
AUTO_FLAT_MAX = 100_000
DEFAULT_MEMORY_BUDGET = 8 << 30
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 128
#: bytes per code (= sub-quantizers at 8 bits) that faiss-gpu's IVFPQ supports
#: (``IVFPQ::isSupportedPQCodeLength``); it also requires 8-bit codes (``verifyPQSettings_``)
GPU_PQ_M = frozenset({1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96})


def gpu_count() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu or on a machine without GPUs)."""
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def _pow2_floor(x: float) -> int:
    return 1 << int(math.floor(math.log2(x))) if x >= 1 else 0


#: up to this many vectors IVF uses at most :data:`NLIST_CAP` lists; beyond, the cap grows to NLIST_CAP_LARGE
LARGE_COLLECTION = 100_000_000
NLIST_CAP = 65_536
NLIST_CAP_LARGE = 1 << 18
#: target vectors per list above LARGE_COLLECTION (2^18 lists at 1B vectors: ~3.8k per list)
LARGE_LIST_SIZE = 3_000


def nlist_for(n: int) -> int:
    """IVF list count: ~4*sqrt(n) (power of two) with >= 39 training points per list; 0 = too few.

    Capped at 65,536 up to 100M vectors (4*sqrt(n) stays below it there); above, about n / 3,000 lists
    (at least 65,536, at most 2^18), so lists stay a few thousand vectors long at 1B (docs/scale-out.md).
    """
    if n > LARGE_COLLECTION:
        return max(NLIST_CAP, min(NLIST_CAP_LARGE, _pow2_floor(n / LARGE_LIST_SIZE)))
    nlist = min(_pow2_floor(4 * math.sqrt(max(n, 1))), _pow2_floor(n / 39), NLIST_CAP)
    return nlist if nlist >= 8 else 0


def pq_m_for(dim: int, max_m: int = 96, gpu: bool = False) -> int:
    """PQ sub-quantizer count: ~4 dimensions per sub-quantizer (at most ``max_m``), dividing ``dim``;
    with ``gpu`` only counts faiss-gpu supports (``GPU_PQ_M``)."""
    for m in range(max(min(dim // 4, max_m), 1), 0, -1):
        if dim % m == 0 and (not gpu or m in GPU_PQ_M):
            return m
    return 1


def choose_factory(
    index_type: str,
    n: int,
    dim: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    gpu: bool | None = None,
) -> str:
    """FAISS factory string for ``index_type`` holding ``n`` vectors of width ``dim``.

    ``auto``: exact while ``n <= 100k`` and the float32 copy fits the budget, then IVF-flat while it
    fits, IVF-PQ beyond. Types that need training fall back to exact until there are enough vectors.
    ``gpu`` (default: whether faiss sees a GPU): IVF-PQ takes 8-bit codes and a GPU-supported
    sub-quantizer count, which faiss-gpu requires; without a GPU small IVF-PQ indexes (< 9,984
    vectors) use 6 or 4 bits. Below that size an index written alternately on GPU and CPU machines
    is therefore rebuilt on save (cheap at that size).
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; expected one of {', '.join(INDEX_TYPES)}")
    float_bytes = n * dim * 4
    if index_type == "auto":
        if n <= AUTO_FLAT_MAX and float_bytes <= memory_budget:
            return FLAT
        index_type = "ivf-flat" if float_bytes * 1.1 <= memory_budget else "ivf-pq"
    if index_type == "flat":
        return FLAT
    if index_type == "hnsw":
        return f"IDMap2,HNSW{HNSW_M},Flat"
    nlist = nlist_for(n)
    if not nlist:
        return FLAT
    if index_type == "ivf-flat":
        return f"IVF{nlist},Flat"
    if gpu is None:
        gpu = gpu_count() > 0
    nbits = 8 if gpu or n >= 39 * 256 else 6 if n >= 39 * 64 else 4
    return f"IVF{nlist},PQ{pq_m_for(dim, gpu=gpu)}x{nbits}np"  # np: no polysemous training (not used)


def is_approximate(factory: str) -> bool:
    return factory != FLAT


def needs_rerank(factory: str) -> bool:
    """Compressed codes (PQ): re-score candidates with the stored vectors."""
    return ",PQ" in factory


def new_index(factory: str, dim: int, metric: str, sample: np.ndarray | None = None) -> faiss.Index:
    """An empty index for ``factory``, trained on ``sample`` when it needs training."""
    index = faiss.index_factory(int(dim), factory, METRICS[metric])
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if index.is_trained:
        return index
    if sample is None or len(sample) == 0:
        raise ValueError(f"index {factory!r} needs training vectors")
    x = np.ascontiguousarray(sample, dtype=np.float32)
    logger.info("training %s on %d vectors", factory, len(x))
    if gpu_count() > 0 and _train_on_gpu(index, x):
        return index
    index.train(x)
    return index


def _train_on_gpu(index: faiss.Index, x: np.ndarray) -> bool:
    """Train ``index`` with its coarse k-means on the GPUs; ``False`` (logged) when that fails.

    The clustering index uses the quantizer's metric (inner product for ``ip``, as the CPU path,
    which clusters with the quantizer itself). ``IndexIVF`` does not own ``clustering_index`` and
    SWIG's attribute setter disowns the Python object, so ownership is taken back here and the
    pointer cleared after training: the GPU index and its resources are freed on return.
    """
    try:
        ivf = faiss.extract_index_ivf(index)
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    except (AttributeError, NameError, RuntimeError) as exc:  # faiss-cpu: no GPU symbols
        logger.warning("GPU k-means unavailable, training on CPU: %r", exc)
        return False
    ivf.clustering_index = clustering
    clustering.thisown = True  # the setter disowned it; IndexIVF never deletes clustering_index
    try:
        index.train(x)
        return True
    except RuntimeError as exc:  # e.g. GPU out of memory: train_q1 resets the quantizer on retry
        logger.warning("GPU k-means failed, training on CPU: %r", exc)
        return False
    finally:
        ivf.clustering_index = None
        del clustering


def set_search_params(
    index: faiss.Index, k: int, nprobe: int | None = None, ef_search: int | None = None
) -> None:
    """Accuracy knobs: IVF ``nprobe`` (default nlist/16, >= 8), HNSW ``efSearch`` (default max(128, 2k))."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.nprobe = int(nprobe or max(8, ivf.nlist // 16))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(ef_search or max(HNSW_EF_SEARCH, 2 * k))


def supports_remove(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return not isinstance(inner, faiss.IndexHNSW)


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def gpu_cloner_options(index: faiss.Index) -> faiss.GpuMultipleClonerOptions:
    """Options for copying ``index`` to the GPUs: float16 lookup tables for PQ, replicas, 64-bit ids.

    The cloner's field is ``useFloat16``: ``ToGpuCloner`` passes it to
    ``GpuIndexIVFPQConfig.useFloat16LookupTables`` (GpuCloner.cpp). It stays off for flat indexes,
    where it would store (and compare) the vectors in float16.
    """
    co = faiss.GpuMultipleClonerOptions()
    co.shard = False  # replicate: every GPU holds the whole index (ids stay 64-bit, the default)
    co.useFloat16 = needs_float16_tables(index)
    return co


def needs_float16_tables(index: faiss.Index) -> bool:
    """True for IVF-PQ indexes (lookup tables of 2^nbits x M floats must fit in shared memory)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ)


def to_search_device(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` for search when faiss has GPUs, else ``index`` itself.

    A failed copy is logged as a WARNING with faiss' reason and search stays on the CPU.
    """
    if gpu_count() == 0:
        return index
    if isinstance(_inner(index), faiss.IndexHNSW):
        logger.debug("HNSW has no GPU version: searching on CPU")
        return index
    try:
        co = gpu_cloner_options(index)
        return faiss.index_cpu_to_all_gpus(index, co=co)
    except (AttributeError, NameError, RuntimeError) as exc:  # faiss-cpu: no GPU symbols
        logger.warning("cannot copy FAISS %s to the GPU, searching on CPU: %s", type(index).__name__, exc)
        return index


def write(index: faiss.Index, path: Path) -> None:
    """Atomically and durably write ``index`` to ``path``."""
    data = faiss.serialize_index(index)
    atomic_write(path, lambda fh: fh.write(data.tobytes()))


def read(path: Path) -> faiss.Index:
    """Read an index file; the lists of an on-disk IVF (:mod:`index.ondisk`) are mapped read-only from
    the ``.ivfdata`` file next to it, wherever the index directory now is."""
    if not Path(path).with_suffix(".ivfdata").exists():
        return faiss.read_index(str(path))
    from index.ondisk import c_stdout_to_stderr

    with c_stdout_to_stderr():  # faiss prints the ivfdata path it takes
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
