"""Index <-> clip-retrieval folders (``img_emb/img_emb_{i}.npy`` + ``metadata/metadata_{i}.parquet``).

Both directions keep row order aligned between the npy and the parquet of one part, the convention
embedding-reader's ``parquet_npy`` format and clip-retrieval's ``clip_back`` rely on. Exported vectors
are the index's float16 vectors, so export -> import reproduces them exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.index import Index
from index.shards import shard_name, write_npy, write_parquet

logger = logging.getLogger(__name__)

#: row fields exported as their own columns; the rest of a row goes to the JSON column ``extra``
EXPORT_COLUMNS = ("id", "root", "relpath", "size", "mtime_ns", "hash", "width", "height", "added_at")
#: metadata columns that name the image, in order of preference (clip-retrieval writes ``image_path``)
PATH_COLUMNS = ("image_path", "path", "url")


@dataclass
class ImportReport:
    """Counts of one import."""

    parts: int = 0
    added: int = 0
    already: int = 0  #: rows whose path was indexed already (not added twice)
    skipped_parts: int = 0
    indexed: int = 0

    def summary(self) -> dict:
        return asdict(self)


def export_embeddings(
    index_dir: str | os.PathLike, out: str | os.PathLike, *, part_size: int = 1_000_000
) -> int:
    """Write the index's rows as clip-retrieval parts under ``out``; returns the number of parts."""
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    out = Path(out)
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    with Index.open(index_dir) as index:
        ids = index.ids()
        parts = math.ceil(len(ids) / part_size)
        for k in range(parts):
            part = ids[k * part_size : (k + 1) * part_size]
            rows = index.get(part)
            vectors = index.get_vectors(part).astype(np.float16)  # exact: the index stores float16
            columns: dict[str, list] = {"image_path": [r["path"] for r in rows]}
            for name in EXPORT_COLUMNS:
                columns[name] = [r.get(name) for r in rows]
            columns["extra"] = [
                json.dumps({k2: v for k2, v in r.items() if k2 not in (*EXPORT_COLUMNS, "path")})
                for r in rows
            ]
            write_npy(out / "img_emb" / f"img_emb_{shard_name(k)}.npy", vectors)
            write_parquet(out / "metadata" / f"metadata_{shard_name(k)}.parquet", pa.table(columns))
    logger.info("exported %d rows in %d parts to %s", len(ids), parts, out)
    return parts


def _pairs(folder: Path) -> Iterator[tuple[str, Path, Path | None]]:
    """``(part name, npy, parquet or None)`` sorted by name."""
    for npy in sorted((folder / "img_emb").glob("img_emb_*.npy")):
        name = npy.stem.removeprefix("img_emb_")
        parquet = folder / "metadata" / f"metadata_{name}.parquet"
        yield name, npy, parquet if parquet.exists() else None


def _plain(value: object) -> object:
    """JSON-able Python value of a parquet cell."""
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _row(meta: dict) -> dict | None:
    path = next((meta[c] for c in PATH_COLUMNS if meta.get(c)), None)
    if meta.get("root") and meta.get("relpath"):
        row = {"root": meta["root"], "relpath": meta["relpath"]}
    elif path is not None:
        row = {"path": path}
    else:
        return None
    for name in ("size", "mtime_ns", "hash", "width", "height", "added_at"):
        if meta.get(name) is not None:
            row[name] = meta[name]
    extra = meta.get("extra")
    if isinstance(extra, str) and extra.startswith("{"):
        row.update(json.loads(extra))
    skip = {*EXPORT_COLUMNS, *PATH_COLUMNS, "extra", "path"}
    row.update({k: _plain(v) for k, v in meta.items() if k not in skip and v is not None})
    row.setdefault("kind", "image")
    return row


def import_embeddings(
    folder: str | os.PathLike,
    index_dir: str | os.PathLike,
    *,
    model: str | None = None,
    mode: str | None = None,
    metric: str = "ip",
    index_type: str = "auto",
) -> ImportReport:
    """Add every part of a clip-retrieval folder to the index at ``index_dir`` (created when missing).

    Rows whose path is already indexed are left alone (re-importing is a no-op); a part without its
    parquet, with a row count that differs from its npy, or with rows naming no image is skipped (logged).
    """
    folder = Path(folder)
    if not (folder / "img_emb").is_dir():
        raise FileNotFoundError(f"{folder}: no img_emb folder (not a clip-retrieval embedding folder)")
    report = ImportReport()
    index: Index | None = None
    if (Path(index_dir) / "manifest.json").exists():
        index = Index.open(index_dir, model=model, mode=mode)
        index.lock_for_writing()
    try:
        files: dict[str, dict] = {}
        for name, npy, parquet in _pairs(folder):
            vectors = np.load(npy, mmap_mode="r", allow_pickle=False)
            if parquet is None:
                logger.warning("%s: no metadata parquet for this part; skipped", npy)
                report.skipped_parts += 1
                continue
            metas = pq.read_table(parquet).to_pylist()
            rows = [_row(m) for m in metas]
            if vectors.ndim != 2 or len(vectors) != len(metas) or any(r is None for r in rows):
                logger.warning(
                    "%s: %s vectors for %d rows (or rows without a path); skipped",
                    name,
                    vectors.shape,
                    len(metas),
                )
                report.skipped_parts += 1
                continue
            if index is None:
                index = Index.create(
                    index_dir, vectors.shape[1], metric=metric, model=model, mode=mode, index_type=index_type
                )
            keep = []
            for k, row in enumerate(rows):
                full = row.get("path") or os.path.join(row["root"], row["relpath"])
                root, rel = (
                    os.path.split(os.path.abspath(full)) if "path" in row else (row["root"], row["relpath"])
                )
                if root not in files:
                    files[root] = index.files(root)
                if rel in files[root]:
                    report.already += 1
                    continue
                files[root][rel] = ()
                keep.append(k)
            if keep:
                index.add(np.asarray(vectors[keep], dtype=np.float32), [rows[k] for k in keep])
                index.save()
            report.parts += 1
            report.added += len(keep)
        if index is not None:
            index.save(full=True)
            report.indexed = len(index)
    finally:
        if index is not None:
            index.close()
    return report
