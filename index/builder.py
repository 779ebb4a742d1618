"""Folder build: walk -> plan -> read in workers -> encode -> write in committed chunks -> report.

Every ``commit_every`` images the encoded chunk is added and the index saved (atomically), so a run
killed at any instant loses at most the uncommitted chunk, and a re-run skips what was committed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index.index import Index
from index.reader import ImageFileDataset, make_loader
from index.vectors import atomic_write
from index.walk import Plan, plan_root, resolve_roots, walk
from retrieval.base import Encoder
from retrieval.images import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

REPORT_FILE = "build_report.json"
SKIPPED_FILE = "skipped.tsv"


@dataclass
class BuildReport:
    """Counts of one run; ``skipped_files`` lists ``(path, reason, message)``."""

    scanned: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    skipped: int = 0
    unchanged: int = 0
    encoded: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    indexed: int = 0
    skipped_files: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON summary printed by ``build_index.py`` (no file list)."""
        out = asdict(self)
        out.pop("skipped_files")
        out["seconds"] = round(self.seconds, 3)
        out["images_per_s"] = round(self.images_per_s, 2)
        return out


def open_or_create(index_dir: str | os.PathLike, encoder: Encoder, index_type: str | None = None) -> Index:
    """Open the index at ``index_dir`` for ``encoder`` (model, mode and dim must match) or create it."""
    folder = Path(index_dir)
    if (folder / "manifest.json").exists():
        index = Index.open(folder, model=encoder.name, dim=encoder.embed_dim, mode=encoder.mode)
        index.lock_for_writing()
        if index_type is not None and index_type != index.manifest["index_type"]:
            logger.info("changing index type %s -> %s", index.manifest["index_type"], index_type)
            index.rebuild(index_type)
        return index
    return Index.create(
        folder, encoder.embed_dim, model=encoder.name, mode=encoder.mode, index_type=index_type or "auto"
    )


class _Chunk:
    """Encoded results waiting for the next commit."""

    def __init__(self) -> None:
        self.vectors: list[np.ndarray] = []
        self.rows: list[dict] = []
        self.replaced: list[int] = []
        self.touched: list[tuple[int, int, int]] = []
        self.failed: dict[str, list[tuple[str, int, int, str, str]]] = {}
        self.fixed: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.rows) + len(self.touched) + sum(map(len, self.failed.values()))

    def commit(self, index: Index) -> None:
        if self.replaced:
            index.remove(self.replaced)
        if self.rows:
            index.add(np.concatenate(self.vectors), self.rows)
        if self.touched:
            index.touch(self.touched)
        for root, failures in self.failed.items():
            index.store.set_failures(root, failures)
        for root, fixed in self.fixed.items():
            index.store.clear_failures(root, fixed)
        index.save()
        self.__init__()


def build_index(
    roots: Sequence[str | os.PathLike],
    index_dir: str | os.PathLike,
    encoder: Encoder,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    index_type: str | None = None,
    prune: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    commit_every: int = 1024,
    progress: bool = True,
    throttle: float = 0.0,
) -> BuildReport:
    """Index the images under ``roots`` into ``index_dir`` incrementally; see the module docstring.

    ``index_type`` ``None`` keeps an existing index's type (``auto`` for a new one). ``throttle``
    sleeps that many seconds per batch (tests use it to interrupt a run midway).
    """
    if batch_size < 1 or commit_every < 1:
        raise ValueError("batch_size and commit_every must be positive")
    start = time.perf_counter()
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    roots = resolve_roots(roots)
    index = open_or_create(index_dir, encoder, index_type)
    try:
        report = BuildReport()
        plan = Plan()
        walk_errors: list[tuple[str, str, str]] = []
        seen: set[tuple[int, int]] = set()
        for root in roots:
            entries = walk([root], lambda p, r, m: walk_errors.append((p, r, m)), within=roots, seen=seen)
            plan_root(
                entries, index.store.by_root(root, index.view_generation), index.store.failures(root), plan
            )
        report.scanned, report.unchanged = plan.scanned + len(walk_errors), plan.unchanged
        report.skipped_files.extend(walk_errors + plan.known_bad)
        logger.info("%d files, %d to read, %d unchanged", plan.scanned, len(plan.work), plan.unchanged)

        dataset = ImageFileDataset(
            plan.work, encoder.image_transform, max_pixels=max_pixels, close_fds=index.inherited_fds()
        )
        loader = make_loader(dataset, batch_size, workers, pin_memory=encoder.device.type == "cuda")
        chunk = _Chunk()
        bar = tqdm(
            total=len(plan.work), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True
        )
        try:
            for pixels, records in loader:
                vectors = encoder.encode_pixels(pixels) if pixels is not None else None
                _collect(records, vectors, plan, chunk, report)
                bar.update(len(records))
                if len(chunk) >= commit_every:
                    chunk.commit(index)
                if throttle:
                    time.sleep(throttle)
            chunk.commit(index)
        except KeyboardInterrupt:
            logger.warning("interrupted: saving the %d images encoded so far", len(chunk.rows))
            chunk.commit(index)
            raise
        finally:
            bar.close()
        if prune and plan.deleted:
            report.removed += index.remove(plan.deleted)
        index.save(full=True)
        report.skipped = len(report.skipped_files)
        report.indexed = len(index)
        report.seconds = time.perf_counter() - start
        report.images_per_s = report.encoded / report.seconds if report.seconds > 0 else 0.0
        write_report(index.dir, report)
    finally:
        index.close()  # releases the writer lock, also after an error
    return report


def _collect(
    records: list[dict], vectors: np.ndarray | None, plan: Plan, chunk: _Chunk, report: BuildReport
) -> None:
    """Sort one batch's records into rows to add, rows to touch and failures."""
    j = 0
    for rec in records:
        item = plan.work[rec["i"]]
        if rec["status"] == "ok":
            chunk.vectors.append(vectors[j : j + 1])
            j += 1
            chunk.rows.append(
                {
                    "root": item.root,
                    "relpath": item.relpath,
                    "size": rec["size"],
                    "mtime_ns": rec["mtime_ns"],
                    "hash": rec["hash"],
                    "width": rec["width"],
                    "height": rec["height"],
                }
            )
            chunk.fixed.setdefault(item.root, []).append(item.relpath)
            report.encoded += 1
            if item.old_id is None:
                report.added += 1
            else:
                chunk.replaced.append(item.old_id)
                report.updated += 1
        elif rec["status"] == "same":
            chunk.touched.append((item.old_id, rec["size"], rec["mtime_ns"]))
            report.unchanged += 1
        else:
            if item.old_id is not None:  # the file changed and no longer decodes: its old row is stale
                chunk.replaced.append(item.old_id)
                report.removed += 1
            chunk.failed.setdefault(item.root, []).append(
                (item.relpath, rec.get("size"), rec.get("mtime_ns"), rec["reason"], rec["message"])
            )
            report.skipped_files.append((item.path, rec["reason"], rec["message"]))
            logger.debug("skipped %s: %s", item.path, rec["message"])


def write_report(folder: Path, report: BuildReport) -> None:
    """``build_report.json`` (summary + skipped files) and ``skipped.tsv`` in the index directory."""
    body = {
        **report.summary(),
        "skipped_files": [{"path": p, "reason": r, "message": m} for p, r, m in report.skipped_files],
    }
    atomic_write(folder / REPORT_FILE, lambda fh: fh.write(json.dumps(body, indent=1).encode()))
    lines = ["path\treason\tmessage"] + [
        "\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in rec) for rec in report.skipped_files
    ]
    atomic_write(folder / SKIPPED_FILE, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
