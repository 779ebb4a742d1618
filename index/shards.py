"""Shard files of a distributed build, in clip-retrieval's layout (engine-neutral, read by embedding-reader).

One folder (``DIR/shards`` for a build) holds, per shard ``s`` (zero-padded, e.g. ``00003``)::

    manifest/manifest_{s}.parquet   work: path, size, mtime (ns), root, relpath, expect_hash
    img_emb/img_emb_{s}.npy         (n, D) float16 embeddings of the rows that decoded
    metadata/metadata_{s}.parquet   aligned with the npy: image_path, root, relpath, size, mtime_ns, hash,
                                    width, height (the commit marker: written last)
    records/records_{s}.parquet     the other rows: status ``same`` (content unchanged) or ``error``
                                    (reason, message), written before the metadata
    merged/{s}                      empty marker once the driver committed the shard into the index

Every file is written to a unique temporary name in its folder, fsynced and renamed, so a writer
killed at any instant leaves no half file under a final name; temporaries of dead writers are removed
by :meth:`ShardDir.clean_temporaries`. A shard is complete once its metadata parquet exists.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.vectors import fsync_dir

logger = logging.getLogger(__name__)

DIGITS = 5
MANIFEST_COLUMNS = ("path", "size", "mtime", "root", "relpath", "expect_hash")
METADATA_SCHEMA = pa.schema(
    [
        ("image_path", pa.string()),
        ("root", pa.string()),
        ("relpath", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("hash", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)
RECORD_SCHEMA = pa.schema(
    [
        ("root", pa.string()),
        ("relpath", pa.string()),
        ("status", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("hash", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)


def shard_name(shard: int) -> str:
    return f"{int(shard):0{DIGITS}d}"


def _atomic(path: Path, write) -> None:  # noqa: ANN001 - write: Callable[[str], None]
    """``write(tmp_path)`` then fsync + rename to ``path``; the temp name is unique per writer."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write an ``.npy`` file."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    _atomic(path, write)


def write_parquet(path: Path, table: pa.Table) -> None:
    """Atomically write a parquet file."""
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


class ShardDir:
    """The shard folder of one build (see the module docstring)."""

    SUBDIRS = ("manifest", "img_emb", "metadata", "records", "merged")

    def __init__(self, folder: str | os.PathLike) -> None:
        self.dir = Path(folder)

    def ensure(self) -> ShardDir:
        for sub in self.SUBDIRS:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------ paths
    def manifest_path(self, shard: int) -> Path:
        return self.dir / "manifest" / f"manifest_{shard_name(shard)}.parquet"

    def emb_path(self, shard: int) -> Path:
        return self.dir / "img_emb" / f"img_emb_{shard_name(shard)}.npy"

    def metadata_path(self, shard: int) -> Path:
        return self.dir / "metadata" / f"metadata_{shard_name(shard)}.parquet"

    def records_path(self, shard: int) -> Path:
        return self.dir / "records" / f"records_{shard_name(shard)}.parquet"

    def merged_path(self, shard: int) -> Path:
        return self.dir / "merged" / shard_name(shard)

    # ------------------------------------------------------------------------------ state
    @staticmethod
    def _numbers(folder: Path, prefix: str, suffix: str) -> set[int]:
        out = set()
        if not folder.is_dir():
            return out
        for p in folder.iterdir():
            name = p.name
            if name.startswith(prefix) and name.endswith(suffix):
                stem = name[len(prefix) : len(name) - len(suffix)]
                if stem.isdigit():
                    out.add(int(stem))
        return out

    def planned(self) -> set[int]:
        return self._numbers(self.dir / "manifest", "manifest_", ".parquet")

    def complete(self) -> set[int]:
        """Shards whose commit marker (metadata parquet) exists."""
        return self._numbers(self.dir / "metadata", "metadata_", ".parquet")

    def merged(self) -> set[int]:
        return self._numbers(self.dir / "merged", "", "")

    def is_complete(self, shard: int) -> bool:
        return self.metadata_path(shard).exists()

    def next_shard(self) -> int:
        """First shard number no earlier run used (orphaned writers of old shards never collide)."""
        used = self.planned() | self.complete() | self.merged()
        return max(used, default=-1) + 1

    def clean_temporaries(self) -> int:
        """Remove temporaries a killed writer left behind; returns how many."""
        n = 0
        for sub in self.SUBDIRS:
            folder = self.dir / sub
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
                    n += 1
        if n:
            logger.info("%s: removed %d stale temporary files", self.dir, n)
        return n

    def drop_unfinished(self) -> list[int]:
        """Forget planned shards that never completed (their work is planned again)."""
        dropped = sorted(self.planned() - self.complete())
        for s in dropped:
            self.manifest_path(s).unlink(missing_ok=True)
            self.emb_path(s).unlink(missing_ok=True)
            self.records_path(s).unlink(missing_ok=True)
        if dropped:
            logger.info("%s: %d unfinished shards dropped (re-planned)", self.dir, len(dropped))
        return dropped

    def mark_merged(self, shard: int) -> None:
        self.merged_path(shard).touch()

    # ------------------------------------------------------------------------------ planning
    def write_manifests(
        self, items: Sequence[dict], shard_size: int, *, seed: int | None = None
    ) -> list[int]:
        """Shuffle ``items`` (dicts with :data:`MANIFEST_COLUMNS`) into manifests of ``shard_size`` rows."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.ensure()
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        first = self.next_shard()
        shards = []
        for k, start in enumerate(range(0, len(order), shard_size)):
            part = [items[i] for i in order[start : start + shard_size]]
            table = pa.table(
                {
                    "path": pa.array([r["path"] for r in part], pa.string()),
                    "size": pa.array([r["size"] for r in part], pa.int64()),
                    "mtime": pa.array([r["mtime"] for r in part], pa.int64()),
                    "root": pa.array([r["root"] for r in part], pa.string()),
                    "relpath": pa.array([r["relpath"] for r in part], pa.string()),
                    "expect_hash": pa.array([r.get("expect_hash") for r in part], pa.string()),
                }
            )
            write_parquet(self.manifest_path(first + k), table)
            shards.append(first + k)
        return shards

    def read_manifest(self, shard: int) -> list[dict]:
        return pq.read_table(self.manifest_path(shard)).to_pylist()

    # ------------------------------------------------------------------------------ results
    def write_shard(self, shard: int, vectors: np.ndarray, metadata: list[dict], records: list[dict]) -> None:
        """Embeddings, then the other records, then the metadata (commit marker); idempotent."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float16)
        if len(vectors) != len(metadata):
            raise ValueError(f"{len(vectors)} vectors but {len(metadata)} metadata rows")
        write_npy(self.emb_path(shard), vectors)
        write_parquet(self.records_path(shard), pa.Table.from_pylist(records, schema=RECORD_SCHEMA))
        write_parquet(self.metadata_path(shard), pa.Table.from_pylist(metadata, schema=METADATA_SCHEMA))

    def read_shard(self, shard: int) -> tuple[np.ndarray, list[dict], list[dict]]:
        """``(vectors float16 (n, D), metadata rows, other records)`` of a complete shard."""
        meta = pq.read_table(self.metadata_path(shard)).to_pylist()
        vectors = np.load(self.emb_path(shard), allow_pickle=False)
        records_path = self.records_path(shard)
        records = pq.read_table(records_path).to_pylist() if records_path.exists() else []
        if vectors.ndim != 2 or len(vectors) != len(meta):
            raise ValueError(f"shard {shard}: {vectors.shape} embeddings for {len(meta)} metadata rows")
        return vectors, meta, records


def group_paths(paths: Iterable[str], roots: Sequence[str]) -> dict[str, list[str]]:
    """``root -> relpaths``: each path under the deepest of ``roots`` containing it, or under its own
    folder when ``roots`` is empty; paths outside all roots are under the key ``""``."""
    out: dict[str, list[str]] = {}
    ordered = sorted(roots, key=len, reverse=True)
    for path in paths:
        path = os.path.abspath(path)
        if not ordered:
            root, rel = os.path.split(path)
        else:
            root = next((r for r in ordered if path.startswith(r.rstrip(os.sep) + os.sep)), "")
            rel = os.path.relpath(path, root) if root else path
        out.setdefault(root, []).append(rel)
    return out
