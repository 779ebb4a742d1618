"""FAISS side of the index: factory strings, the ``auto`` choice, training on a sample, GPU use.

Every index keeps FAISS ids equal to SQLite row ids: ``IDMap2`` wraps flat and HNSW indexes, IVF
indexes take ids natively. GPUs (``faiss.get_num_gpus() > 0``, i.e. faiss-gpu) are used for
k-means training and for search; without them everything runs on CPU with the same results
within floating-point tolerance.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np

from index.vectors import atomic_write

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


def gpu_count() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu or on a machine without GPUs)."""
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def _pow2_floor(x: float) -> int:
    return 1 << int(math.floor(math.log2(x))) if x >= 1 else 0


def nlist_for(n: int) -> int:
    """IVF list count: ~4*sqrt(n) (power of two) with >= 39 training points per list; 0 = too few."""
    nlist = min(_pow2_floor(4 * math.sqrt(max(n, 1))), _pow2_floor(n / 39), 65536)
    return nlist if nlist >= 8 else 0


def pq_m_for(dim: int, max_m: int = 96) -> int:
    """PQ sub-quantizer count: ~4 dimensions per sub-quantizer (at most ``max_m``), dividing ``dim``."""
    for m in range(max(min(dim // 4, max_m), 1), 0, -1):
        if dim % m == 0:
            return m
    return 1


def choose_factory(index_type: str, n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """FAISS factory string for ``index_type`` holding ``n`` vectors of width ``dim``.

    ``auto``: exact while ``n <= 100k`` and the float32 copy fits the budget, then IVF-flat while it
    fits, IVF-PQ beyond. Types that need training fall back to exact until there are enough vectors.
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
    nbits = 8 if n >= 39 * 256 else 6 if n >= 39 * 64 else 4
    return f"IVF{nlist},PQ{pq_m_for(dim)}x{nbits}np"  # np: no polysemous training (not used)


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
    if gpu_count() > 0:
        try:  # GPU k-means for the coarse quantizer (faiss wiki recipe)
            ivf = faiss.extract_index_ivf(index)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(int(dim)))
        except Exception as exc:  # noqa: BLE001 - any GPU set-up failure (faiss-cpu raises NameError) -> CPU
            logger.warning("GPU training unavailable, training on CPU: %r", exc)
    logger.info("training %s on %d vectors", factory, len(sample))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


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


def to_search_device(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` for search when faiss has GPUs, else ``index`` itself."""
    if gpu_count() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception as exc:  # noqa: BLE001 - e.g. HNSW has no GPU version; faiss-cpu raises NameError
        logger.info("searching on CPU (%r)", exc)
        return index


def write(index: faiss.Index, path: Path) -> None:
    """Atomically and durably write ``index`` to ``path``."""
    data = faiss.serialize_index(index)
    atomic_write(path, lambda fh: fh.write(data.tobytes()))


def read(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
