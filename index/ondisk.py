"""On-disk IVF for large collections, built the way faiss' contrib does (``faiss.contrib.ondisk``).

1. Train an empty IVF once on a random sample of the stored vectors (written as ``trained.index``).
2. Each block of rows (contiguous runs of ids, so lists keep the order of an in-memory build) adds its
   stored vectors to a copy of the trained empty index -> one ``block-*.index`` file per block. The blocks
   are independent: :func:`add_block` runs in-process or as parallel Ray tasks (``map_blocks``).
3. :func:`merge_blocks` (``merge_ondisk``) concatenates the blocks' inverted lists into one
   ``faiss/<gen>.ivfdata`` file that the populated index ``faiss/<gen>.faiss`` references.

FAISS ids are the SQLite row ids (IVF takes ids natively). Readers open the lists memory-mapped and
read-only (:func:`index.faiss_index.read`, ``IO_FLAG_ONDISK_SAME_DIR`` finds the ``.ivfdata`` next to
the ``.faiss`` file wherever the index directory is). An ``.ivfdata`` file is never written after its
manifest commits (other readers map it): the first change to such an index (an add, a remove, a
delta replayed on open) copies the lists into memory (:func:`to_memory`), and the next FAISS write
stores an ordinary in-memory index until the next on-disk save.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from index.faiss_index import faiss
from index.vectors import VectorStore, fsync_dir

logger = logging.getLogger(__name__)

#: ``build_index_ray(ondisk=None)`` writes an on-disk IVF above this many vectors
ONDISK_MIN_VECTORS = 20_000_000
#: rows per block (one add task each)
BLOCK_ROWS = 1_000_000

_STDOUT_LOCK = threading.Lock()

#: ``map_blocks(add_block, [args, ...]) -> [block path, ...]``: runs :func:`add_block` once per args tuple
BlockMapper = Callable[[Callable[..., str], Sequence[tuple]], list[str]]


def run_local(fn: Callable[..., str], args: Sequence[tuple]) -> list[str]:
    """The default :data:`BlockMapper`: one block after the other in this process."""
    return [fn(*a) for a in args]


@contextlib.contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """Send what faiss' C++ code prints (``printf``: "resizing ...", "IO_FLAG_ONDISK_SAME_DIR: updating ...")
    to stderr, keeping stdout for the CLI's JSON summary (process-wide file descriptor 1, for the moment)."""
    with _STDOUT_LOCK:
        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        libc.fflush(None)
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def is_ondisk(index: faiss.Index) -> bool:
    """Whether ``index`` is an IVF whose inverted lists live in an ``.ivfdata`` file."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def to_memory(index: faiss.Index) -> faiss.Index:
    """``index`` with its on-disk inverted lists copied into memory (in place; returned for chaining)."""
    if not is_ondisk(index):
        return index
    ivf = faiss.extract_index_ivf(index)
    logger.info("copying %d on-disk IVF entries into memory before changing them", index.ntotal)
    mem = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.invlists.copy_subset_to(mem, faiss.InvertedLists.SUBSET_TYPE_ID_RANGE, 0, np.iinfo(np.int64).max)
    ivf.replace_invlists(mem, True)
    mem.this.disown()  # owned by the index now
    return index


def blocks(
    live: Sequence[tuple[int, int, int]], size: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(id, segment, offset)`` rows (id order) -> contiguous ``(ids, locations)`` blocks of ``size``
    (default :data:`BLOCK_ROWS`) rows."""
    size = int(size or BLOCK_ROWS)
    arr = np.asarray(live, dtype=np.int64).reshape(-1, 3)
    return [(arr[i : i + size, 0].copy(), arr[i : i + size, 1:].copy()) for i in range(0, len(arr), size)]


def add_block(
    trained_path: str, vectors_dir: str, dim: int, ids: np.ndarray, locs: np.ndarray, out_path: str
) -> str:
    """Add the stored vectors at ``locs`` (``(n, 2)`` segment, offset) with ``ids`` to a copy of the trained
    empty index and write it to ``out_path`` (temp name, then renamed). Returns ``out_path``."""
    index = faiss.read_index(trained_path)
    index.add_with_ids(VectorStore(Path(vectors_dir), dim).gather(locs), np.asarray(ids, dtype=np.int64))
    tmp = f"{out_path}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out_path)
    return out_path


def merge_blocks(trained: faiss.Index, block_paths: Sequence[str], ivfdata: Path) -> faiss.Index:
    """Populate the empty ``trained`` index with the lists of ``block_paths`` stored in ``ivfdata``
    (faiss' ``merge_ondisk``; fsynced). Returns ``trained``."""
    from faiss.contrib.ondisk import merge_ondisk

    with c_stdout_to_stderr():
        merge_ondisk(trained, [str(p) for p in block_paths], str(ivfdata))
    fd = os.open(ivfdata, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(Path(ivfdata).parent)
    return trained


def companion(faiss_file: str) -> str:
    """The ``.ivfdata`` file name that goes with a ``.faiss`` file name (``faiss/<gen>.ivfdata``)."""
    return str(Path(faiss_file).with_suffix(".ivfdata"))
