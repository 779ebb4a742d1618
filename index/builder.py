"""Folder build: walk -> plan -> read in workers -> encode -> write in committed chunks -> report.

Every ``commit_every`` images the encoded chunk is added and the index saved (atomically), so a run
killed at any instant loses at most the uncommitted chunk, and a re-run skips what was committed.

Video files (:data:`chat.video.VIDEO_EXTENSIONS`) are embedded after the images, one at a time in this
process (:func:`retrieval.video.embed_video`): one ``kind="video"`` row per file and, with
``video_segments``, one ``kind="segment"`` row per segment carrying ``t_start`` / ``t_end``. A video's
rows are committed together, so an interrupted run never leaves a video half indexed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chat.video import VIDEO_EXTENSIONS, VideoDecodeError
from index.captions import caption_index
from index.index import Index
from index.reader import ImageFileDataset, make_loader
from index.vectors import atomic_write
from index.walk import FileEntry, Plan, WorkItem, plan_root, resolve_roots, walk
from retrieval.base import Encoder
from retrieval.images import DEFAULT_MAX_PIXELS, supported_extensions
from retrieval.video import VIDEO_EMBED_FRAMES, embed_video

logger = logging.getLogger(__name__)

REPORT_FILE = "build_report.json"
SKIPPED_FILE = "skipped.tsv"
#: videos lasting longer are skipped (reason ``too_long``)
DEFAULT_MAX_VIDEO_SECONDS = 3 * 3600.0
#: video files larger than this are skipped (reason ``too_large``)
DEFAULT_MAX_VIDEO_BYTES = 8 << 30


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
    videos: int = 0  #: videos embedded in this run
    segments: int = 0  #: segment rows added in this run
    captioned: int = 0  #: rows captioned in this run (``caption=True``)
    with_caption: int = 0  #: rows of the index that have a caption
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
            index.set_failures(root, failures)
        for root, fixed in self.fixed.items():
            index.clear_failures(root, fixed)
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
    videos: bool = True,
    video_segments: float | None = None,
    max_video_seconds: float | None = DEFAULT_MAX_VIDEO_SECONDS,
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    caption: bool = False,
    caption_prompt: str = "English caption:",
    caption_batch_size: int = 8,
) -> BuildReport:
    """Index the images (and videos) under ``roots`` into ``index_dir`` incrementally; see the module
    docstring.

    ``index_type`` ``None`` keeps an existing index's type (``auto`` for a new one). ``throttle``
    sleeps that many seconds per batch or video (tests use it to interrupt a run midway).
    ``video_segments`` (seconds) adds segment rows; videos indexed with another setting are re-embedded.
    ``caption`` then captions every row that has no caption yet (:mod:`index.captions`).
    """
    if batch_size < 1 or commit_every < 1:
        raise ValueError("batch_size and commit_every must be positive")
    if video_segments is not None and not video_segments > 0:
        raise ValueError(f"video_segments must be > 0 seconds, got {video_segments}")
    start = time.perf_counter()
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    roots = resolve_roots(roots)
    index = open_or_create(index_dir, encoder, index_type)
    try:
        report = BuildReport()
        plan = plan_build(roots, index, report, videos=videos, video_segments=video_segments)
        video_work = [w for w in plan.work if _is_video(w.relpath)]
        plan.work = [w for w in plan.work if not _is_video(w.relpath)]

        dataset = ImageFileDataset(
            plan.work, encoder.image_transform, max_pixels=max_pixels, close_fds=index.inherited_fds()
        )
        loader = make_loader(dataset, batch_size, workers, pin_memory=encoder.device.type == "cuda")
        chunk = _Chunk()
        bar = tqdm(
            total=len(plan.work) + len(video_work),
            unit="file" if video_work else "img",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
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
            embed_videos(
                video_work,
                index,
                encoder,
                chunk,
                report,
                bar=bar,
                commit_every=commit_every,
                throttle=throttle,
                video_segments=video_segments,
                max_video_seconds=max_video_seconds,
                max_pixels=max_pixels,
                max_video_bytes=max_video_bytes,
                batch_size=batch_size,
            )
        except KeyboardInterrupt:
            logger.warning("interrupted: saving the %d rows encoded so far", len(chunk.rows))
            chunk.commit(index)
            raise
        finally:
            bar.close()
        finish_build(
            index, plan, report, start, prune=prune, encoder=encoder, caption=caption,
            caption_prompt=caption_prompt, caption_batch_size=caption_batch_size, max_pixels=max_pixels,
            progress=progress,
        )  # fmt: skip
    finally:
        index.close()  # releases the writer lock, also after an error
    return report


def plan_build(
    roots: Sequence[str],
    index: Index,
    report: BuildReport,
    *,
    videos: bool = True,
    video_segments: float | None = None,
    listed: dict[str, list[tuple[str, int, int]]] | None = None,
) -> Plan:
    """Walk resolved ``roots`` (or take ``listed``: ``root -> [(relpath, size, mtime_ns)]``) and diff
    them against ``index``; fills ``report``'s scanned / unchanged / skipped_files."""
    extensions = supported_extensions() | VIDEO_EXTENSIONS if videos else supported_extensions()
    plan = Plan()
    walk_errors: list[tuple[str, str, str]] = []
    seen: set[tuple[int, int]] = set()
    for root in roots if listed is None else list(listed):
        if listed is None:
            on_error = lambda p, r, m: walk_errors.append((p, r, m))  # noqa: E731
            entries = walk([root], on_error, extensions, within=roots, seen=seen)
        else:
            entries = (FileEntry(root, rel, size, mtime) for rel, size, mtime in listed[root])
        indexed_videos = index.file_extras(root, '"kind": "video"')
        stale = {
            rel for rel, extra in indexed_videos.items() if extra.get("video_segments") != video_segments
        }
        plan_root(entries, index.files(root), index.failures(root), plan, index.file_parts(root), stale)
    report.scanned, report.unchanged = plan.scanned + len(walk_errors), plan.unchanged
    report.skipped_files.extend(walk_errors + plan.known_bad)
    logger.info("%d files, %d to read, %d unchanged", plan.scanned, len(plan.work), plan.unchanged)
    return plan


def embed_videos(
    video_work: Sequence[WorkItem],
    index: Index,
    encoder: Encoder,
    chunk: _Chunk,
    report: BuildReport,
    *,
    bar: tqdm | None = None,
    commit_every: int = 1024,
    throttle: float = 0.0,
    video_segments: float | None = None,
    max_video_seconds: float | None = DEFAULT_MAX_VIDEO_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    batch_size: int = 32,
) -> None:
    """Embed videos one at a time in this process and commit them (a video's rows together)."""
    if video_work:
        logger.info("%d videos to read", len(video_work))
    for item in video_work:
        rec = _read_video(
            item,
            encoder,
            segment_seconds=video_segments,
            max_duration=max_video_seconds,
            max_pixels=max_pixels,
            max_bytes=max_video_bytes,
            batch_size=batch_size,
        )
        _collect_video(item, rec, chunk, report)
        if bar is not None:
            bar.update(1)
        if len(chunk) >= commit_every:
            chunk.commit(index)
        if throttle:
            time.sleep(throttle)
    chunk.commit(index)


def finish_build(
    index: Index,
    plan: Plan,
    report: BuildReport,
    start: float,
    *,
    prune: bool = False,
    encoder: Encoder | None = None,
    caption: bool = False,
    caption_prompt: str = "English caption:",
    caption_batch_size: int = 8,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    final_save: Callable[[Index], object] | None = None,
) -> None:
    """Prune, final full save (``final_save(index)`` instead of ``index.save(full=True)`` when given,
    e.g. the Ray engine's on-disk IVF), the caption pass (``caption``: rows without one), counts and
    ``build_report.json`` / ``skipped.tsv``."""
    if prune and plan.deleted:
        report.removed += index.remove(plan.deleted)
    if final_save is None:
        index.save(full=True)
    else:
        final_save(index)
    if caption:
        if encoder is None:
            raise ValueError("caption=True needs the encoder")
        report.captioned, caption_skips = caption_index(
            index, encoder, prompt=caption_prompt, batch_size=caption_batch_size,
            max_pixels=max_pixels, progress=progress,
        )  # fmt: skip
        report.skipped_files.extend(caption_skips)
    report.with_caption = index.captioned_count()
    report.skipped = len(report.skipped_files)
    report.indexed = len(index)
    report.seconds = time.perf_counter() - start
    report.images_per_s = report.encoded / report.seconds if report.seconds > 0 else 0.0
    write_report(index.dir, report)


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
                    "kind": "image",
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


def _is_video(relpath: str) -> bool:
    return os.path.splitext(relpath)[1].lower() in VIDEO_EXTENSIONS


def _file_hash(path: str) -> str:
    """Streaming :func:`index.reader.content_hash` of a file (videos are not read into memory)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_video(
    item: WorkItem,
    encoder: Encoder,
    *,
    segment_seconds: float | None,
    max_duration: float | None,
    max_pixels: int | None,
    max_bytes: int,
    batch_size: int,
) -> dict:
    """One video -> a record like :class:`index.reader.ImageFileDataset`'s, with ``rows`` and ``vectors``
    (whole video first, then its segments) when ``status`` is ``ok``. Never raises for a bad file."""
    rec: dict = {"status": "error", "reason": None, "message": None}
    try:
        st = os.stat(item.path)
        rec.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        if st.st_size > max_bytes:
            message = f"{item.path}: file has {st.st_size} bytes, over the limit of {max_bytes}"
            return {**rec, "reason": "too_large", "message": message}
        rec["hash"] = _file_hash(item.path)
    except FileNotFoundError as exc:
        return {**rec, "reason": "vanished", "message": f"file disappeared during the run: {exc}"}
    except OSError as exc:
        return {**rec, "reason": "unreadable", "message": f"cannot read file: {exc}"}
    if item.expect_hash is not None and rec["hash"] == item.expect_hash:
        return {**rec, "status": "same"}
    try:
        emb = embed_video(
            encoder,
            item.path,
            num_frames=VIDEO_EMBED_FRAMES,
            segment_seconds=segment_seconds,
            max_duration=max_duration,
            max_pixels=max_pixels,
            batch_size=batch_size,
        )
    except VideoDecodeError as exc:
        message = str(exc)
        return {
            **rec,
            "reason": exc.reason,
            "message": message if item.path in message else f"{item.path}: {message}",
        }
    except Exception as exc:  # noqa: BLE001 - one odd file must not end the build
        logger.warning("%s: unexpected error while decoding the video: %r", item.path, exc)
        return {**rec, "reason": "undecodable", "message": f"{type(exc).__name__}: {exc}"}
    info = emb.info
    base = {
        "root": item.root, "relpath": item.relpath, "size": rec["size"], "mtime_ns": rec["mtime_ns"],
        "hash": rec["hash"], "width": info.width, "height": info.height, "video_segments": segment_seconds,
    }  # fmt: skip
    rows = [
        {**base, "kind": "video", "part": 0, "t_start": 0.0, "t_end": round(info.duration, 6),
         "duration": round(info.duration, 6), "fps": info.fps, "frame_count": info.frame_count},
    ]  # fmt: skip
    rows += [
        {
            **base,
            "kind": "segment",
            "part": k + 1,
            "t_start": round(seg.t_start, 6),
            "t_end": round(seg.t_end, 6),
        }
        for k, seg in enumerate(emb.segments)
    ]
    vectors = np.stack([emb.vector, *(seg.vector for seg in emb.segments)]).astype(np.float32)
    return {**rec, "status": "ok", "rows": rows, "vectors": vectors}


def _collect_video(item: WorkItem, rec: dict, chunk: _Chunk, report: BuildReport) -> None:
    """Sort one video's record into rows to add (whole video + segments), rows to touch or a failure."""
    old = [item.old_id, *item.old_parts] if item.old_id is not None else list(item.old_parts)
    if rec["status"] == "ok":
        chunk.vectors.append(rec["vectors"])
        chunk.rows.extend(rec["rows"])
        chunk.fixed.setdefault(item.root, []).append(item.relpath)
        chunk.replaced.extend(old)
        report.encoded += 1
        report.videos += 1
        report.segments += len(rec["rows"]) - 1
        if item.old_id is None:
            report.added += 1
        else:
            report.updated += 1
    elif rec["status"] == "same":
        chunk.touched.extend((i, rec["size"], rec["mtime_ns"]) for i in old)
        report.unchanged += 1
    else:
        if old:  # the file changed and no longer decodes: its old rows are stale
            chunk.replaced.extend(old)
            report.removed += 1
        chunk.failed.setdefault(item.root, []).append(
            (item.relpath, rec.get("size"), rec.get("mtime_ns"), rec["reason"], rec["message"])
        )
        report.skipped_files.append((item.path, rec["reason"], rec["message"]))
        logger.debug("skipped %s: %s", item.path, rec["message"])


def write_report(folder: Path, report: BuildReport) -> None:
    """``build_report.json`` (summary + skipped files) and ``skipped.tsv`` in the index directory, the
    skipped files sorted by path (the same for both engines)."""
    report.skipped_files.sort()
    body = {
        **report.summary(),
        "skipped_files": [{"path": p, "reason": r, "message": m} for p, r, m in report.skipped_files],
    }
    atomic_write(folder / REPORT_FILE, lambda fh: fh.write(json.dumps(body, indent=1).encode()))
    lines = ["path\treason\tmessage"] + [
        "\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in rec) for rec in report.skipped_files
    ]
    atomic_write(folder / SKIPPED_FILE, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
