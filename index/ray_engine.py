"""Build engine on Ray (``build_index.py --engine ray``): the local engine's index, built across a cluster.

1. **Plan** (driver): walk the folders or read a parquet list of paths, diff against the index as the
   local engine does (:func:`index.builder.plan_build`), write the image work as shuffled manifest shards
   (:class:`index.shards.ShardDir`, ``DIR/shards``).
2. **Embed** (cluster): a Ray Data actor pool (``ShardEmbedder``, the model loaded once per actor,
   ``num_gpus=1`` when the cluster has GPUs) takes one shard per call; it fans the shard's files out to
   CPU decode tasks (:class:`index.reader.ImageFileDataset`: pixel guard, EXIF, error records with
   reasons), encodes what decoded and writes the shard in clip-retrieval's layout (npy float16 +
   parquet, the parquet last as the commit marker).
3. **Merge** (driver): each finished shard is committed into the index through public ``Index`` methods
   and saved atomically, then marked merged; videos are embedded on the driver as by the local engine.

Vectors: the index stores float16 (``vectors/seg-*.npy``; FAISS holds the float16 values widened), so
the float16 shard files carry exactly what the index keeps and no float32 copy is needed. The float32
encoder output differs between batch compositions by ~1e-7, which can flip a float16 rounding: with
``batch_size=1`` both engines store identical vectors.

Faults: a dead actor or worker is restarted and its shard retried by Ray (``max_restarts`` /
``max_task_retries`` default -1 in actor pools, decode tasks ``max_retries``); shard writes are
idempotent and atomic. A killed driver loses only unfinished shards: the next run cleans temporaries,
merges finished-but-unmerged shards (idempotently: a row already indexed with the same content is not
added twice), drops unfinished manifests and plans only what is still missing, under new shard numbers.
The shard folder must be on storage every node sees (NFS, a shared disk); see ``docs/scale-out.md``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from index import ondisk as od
from index.builder import (
    DEFAULT_MAX_VIDEO_BYTES,
    DEFAULT_MAX_VIDEO_SECONDS,
    BuildReport,
    _Chunk,
    _is_video,
    embed_videos,
    finish_build,
    open_or_create,
    plan_build,
)
from index.index import Index
from index.reader import ImageFileDataset
from index.shards import ShardDir, group_paths
from index.walk import WorkItem, resolve_roots
from retrieval.base import Encoder
from retrieval.images import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

#: shard folder inside the index directory
SHARD_FOLDER = "shards"
DEFAULT_SHARD_SIZE = 10_000
#: a decode task's retries after its worker died (decoding never raises for a bad file)
DECODE_RETRIES = 5
#: files per decode task (at least the encode batch size)
DECODE_CHUNK = 64


class RayEngineError(RuntimeError):
    """The Ray pipeline failed (after Ray's own retries); committed shards are kept."""


def _decode(items: list[dict], transform, max_pixels: int | None) -> list[dict]:  # noqa: ANN001
    """Decode + preprocess manifest rows into records like :class:`ImageFileDataset`'s (numpy pixels)."""
    work = [WorkItem(r["root"], r["relpath"], None, r["expect_hash"]) for r in items]
    dataset = ImageFileDataset(work, transform, max_pixels=max_pixels)
    out = []
    for i in range(len(dataset)):
        rec = dataset[i]
        if rec["pixels"] is not None:
            rec["pixels"] = rec["pixels"].numpy()
        out.append(rec)
    return out


_decode_task = ray.remote(num_cpus=1, max_retries=DECODE_RETRIES)(_decode)


class ShardEmbedder:
    """Ray Data actor: one shard per call -> decode tasks -> encode -> shard files. Returns the shard ids."""

    def __init__(
        self,
        spec: dict,
        shard_dir: str,
        batch_size: int,
        in_flight: int,
        max_pixels: int | None,
        throttle: float = 0.0,
    ) -> None:
        from retrieval import load_encoder

        self.encoder = load_encoder(
            spec["model"], mode=spec["mode"], device=spec["device"], dtype=spec["dtype"]
        )
        self.work = ShardDir(shard_dir)
        self.batch_size = batch_size
        self.in_flight = max(1, in_flight)
        self.max_pixels = max_pixels
        self.throttle = throttle
        self.transform = ray.put(self.encoder.image_transform)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        for shard in batch["shard"]:
            shard = int(shard)
            if not self.work.is_complete(shard):  # a retried call may find its shard written already
                self._embed(shard)
            done.append(shard)
        return {"shard": np.asarray(done, dtype=np.int64)}

    def _embed(self, shard: int) -> None:
        items = self.work.read_manifest(shard)
        size = max(self.batch_size, DECODE_CHUNK)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        queue: deque = deque()
        submitted = 0
        vectors: list[np.ndarray] = []
        metadata: list[dict] = []
        records: list[dict] = []
        while submitted < len(chunks) or queue:
            while submitted < len(chunks) and len(queue) < self.in_flight:
                queue.append(_decode_task.remote(chunks[submitted], self.transform, self.max_pixels))
                submitted += 1
            chunk = chunks[submitted - len(queue)]
            recs = ray.get(queue.popleft())
            ok = [r for r in recs if r["status"] == "ok"]
            for start in range(0, len(ok), self.batch_size):  # the local engine's batches: ok records only
                part = ok[start : start + self.batch_size]
                vectors.append(
                    self.encoder.encode_pixels(torch.from_numpy(np.stack([r["pixels"] for r in part])))
                )
                if self.throttle:
                    time.sleep(self.throttle)
            for item, rec in zip(chunk, recs, strict=True):
                base = {"root": item["root"], "relpath": item["relpath"], "size": rec.get("size")}
                base.update(mtime_ns=rec.get("mtime_ns"), hash=rec.get("hash"))
                if rec["status"] == "ok":
                    metadata.append(
                        {**base, "image_path": item["path"], "width": rec["width"], "height": rec["height"]}
                    )
                else:
                    records.append(
                        {**base, "status": rec["status"], "reason": rec["reason"], "message": rec["message"]}
                    )
        dim = self.encoder.embed_dim
        emb = np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
        self.work.write_shard(shard, emb, metadata, records)


def _unchanged(row: dict) -> bool:
    """Whether the file of a shard row still has the row's size and mtime."""
    try:
        st = os.stat(os.path.join(row["root"], row["relpath"]))
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (row["size"], row["mtime_ns"])


class ShardMerger:
    """Commits finished shards into an index (driver side), idempotently; see the module docstring."""

    def __init__(self, index: Index, work: ShardDir) -> None:
        self.index = index
        self.work = work
        self._files: dict[str, dict[str, tuple[int, int, int, str]]] = {}

    def files(self, root: str) -> dict[str, tuple[int, int, int, str]]:
        if root not in self._files:
            self._files[root] = self.index.files(root)
        return self._files[root]

    def merge(self, shard: int, report: BuildReport, *, verify: bool = False) -> None:
        """Add shard ``shard`` to the index, save, mark it merged; counts go to ``report``.

        ``verify`` (shards of an earlier run): rows whose file no longer has the shard's size and mtime
        are left out (the plan reads those files again), so a stale shard never replaces newer rows.
        """
        vectors, meta, records = self.work.read_shard(shard)
        if verify:
            fresh = [k for k, m in enumerate(meta) if _unchanged(m)]
            vectors, meta = vectors[fresh], [meta[k] for k in fresh]
            records = [r for r in records if _unchanged(r)]
        chunk = _Chunk()
        keep: list[int] = []
        for k, m in enumerate(meta):
            root, rel = m["root"], m["relpath"]
            known = self.files(root).get(rel)
            if known is not None and tuple(known[1:]) == (m["size"], m["mtime_ns"], m["hash"]):
                continue  # merged before (a resumed or repeated shard)
            if known is None:
                report.added += 1
            else:
                chunk.replaced.append(known[0])
                report.updated += 1
            keep.append(k)
            chunk.rows.append(
                {
                    "root": root,
                    "relpath": rel,
                    "size": m["size"],
                    "mtime_ns": m["mtime_ns"],
                    "hash": m["hash"],
                    "width": m["width"],
                    "height": m["height"],
                    "kind": "image",
                }
            )
            chunk.fixed.setdefault(root, []).append(rel)
            report.encoded += 1
        for r in records:
            root, rel = r["root"], r["relpath"]
            known = self.files(root).get(rel)
            if r["status"] == "same":
                if known is not None and known[3] == r["hash"]:
                    chunk.touched.append((known[0], r["size"], r["mtime_ns"]))
                report.unchanged += 1
                continue
            if known is not None:  # the file changed and no longer decodes: its old row is stale
                chunk.replaced.append(known[0])
                report.removed += 1
            chunk.failed.setdefault(root, []).append(
                (rel, r["size"], r["mtime_ns"], r["reason"], r["message"])
            )
            report.skipped_files.append((os.path.join(root, rel), r["reason"], r["message"]))
        self._commit(chunk, vectors[keep])
        self.work.mark_merged(shard)

    def _commit(self, chunk: _Chunk, vectors: np.ndarray) -> None:
        index = self.index
        if chunk.replaced:
            index.remove(chunk.replaced)
            gone = set(chunk.replaced)
            for files in self._files.values():
                for rel in [rel for rel, v in files.items() if v[0] in gone]:
                    del files[rel]
        if chunk.rows:
            ids = index.add(vectors.astype(np.float32), chunk.rows)
            for rid, row in zip(ids, chunk.rows, strict=True):
                files = self.files(row["root"])
                files[row["relpath"]] = (int(rid), row["size"], row["mtime_ns"], row["hash"])
        if chunk.touched:
            index.touch(chunk.touched)
            updates = {i: (s, m) for i, s, m in chunk.touched}
            for files in self._files.values():
                for rel, v in files.items():
                    if v[0] in updates:
                        files[rel] = (v[0], *updates[v[0]], v[3])
        for root, failures in chunk.failed.items():
            index.set_failures(root, failures)
        for root, fixed in chunk.fixed.items():
            index.clear_failures(root, fixed)
        index.save(keep_structure=True)  # the final full save trains IVF once, on a sample of all shards


def read_list(
    list_file: str | os.PathLike, roots: Sequence[str]
) -> tuple[dict[str, list[tuple[str, int, int]]], list[tuple[str, str, str]]]:
    """A parquet list of paths (column ``path``; optional ``size`` and ``mtime`` in ns, else stat'ed)
    -> ``root -> [(relpath, size, mtime_ns)]`` and ``(path, reason, message)`` for unusable entries."""
    table = pq.read_table(list_file)
    if "path" not in table.column_names:
        raise ValueError(f"{list_file}: no 'path' column (columns: {table.column_names})")
    paths = [str(p) for p in table.column("path").to_pylist() if p]
    sizes = table.column("size").to_pylist() if "size" in table.column_names else None
    mtimes = table.column("mtime").to_pylist() if "mtime" in table.column_names else None
    known = {
        os.path.abspath(p): (s, m)
        for p, s, m in zip(paths, sizes or [None] * len(paths), mtimes or [None] * len(paths), strict=True)
    }
    errors: list[tuple[str, str, str]] = []
    out: dict[str, list[tuple[str, int, int]]] = {}
    for root, rels in group_paths(known, roots).items():
        for rel in rels:
            path = os.path.join(root, rel) if root else rel
            if not root:
                errors.append((path, "outside_roots", "listed file is not under any FOLDER given"))
                continue
            size, mtime = known[path]
            if size is None or mtime is None:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    errors.append((path, "unreadable", "listed file not found"))
                    continue
                except OSError as exc:
                    errors.append((path, "unreadable", str(exc)))
                    continue
                size, mtime = st.st_size, st.st_mtime_ns
            out.setdefault(root, []).append((rel, int(size), int(mtime)))
    for rels in out.values():
        rels.sort()
    return out, errors


def _connect(address: str | None) -> bool:
    """Attach to ``address`` (or start a local instance); True when this call started Ray."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def _resources(spec: dict, encoders: int | None, decoders: int | None) -> tuple[dict, int, int, float]:
    """Actor spec (device), encoder count, decode tasks in flight per actor, GPUs per actor."""
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    use_gpu = gpus > 0 and spec.get("device") not in ("cpu",)
    spec = {**spec, "device": "cuda" if use_gpu else "cpu"}
    if use_gpu:
        n_enc = encoders or gpus
    else:  # an encoder actor holds one CPU: leave at least one for decoding
        n_enc = min(encoders or 1, max(1, cpus - 1))
        if encoders and n_enc < encoders:
            logger.warning(
                "%d encoders need %d CPUs: using %d (cluster has %d CPUs)",
                encoders,
                encoders + 1,
                n_enc,
                cpus,
            )
    n_dec = decoders or max(1, cpus - (0 if use_gpu else n_enc))
    return spec, n_enc, max(1, math.ceil(2 * n_dec / n_enc)), 1.0 if use_gpu else 0.0


def _embed_shards(
    shards: list[int],
    work: ShardDir,
    merger: ShardMerger,
    report: BuildReport,
    spec: dict,
    *,
    encoders: int | None,
    decoders: int | None,
    batch_size: int,
    max_pixels: int | None,
    progress: bool,
    throttle: float,
) -> None:
    spec, n_enc, in_flight, gpus = _resources(spec, encoders, decoders)
    logger.info(
        "%d shards on %d encoder actors (%s), %d decode tasks in flight each",
        len(shards),
        n_enc,
        spec["device"],
        in_flight,
    )
    ray.data.DataContext.get_current().enable_progress_bars = progress
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(
        ShardEmbedder,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_enc),
        num_gpus=gpus,
        num_cpus=1,
        fn_constructor_kwargs={
            "spec": spec,
            "shard_dir": str(work.dir),
            "batch_size": batch_size,
            "in_flight": in_flight,
            "max_pixels": max_pixels,
            "throttle": throttle,
        },
    )
    pending = set(shards)
    bar = tqdm(total=len(shards), unit="shard", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for row in ds.iter_rows():
            shard = int(row["shard"])
            if shard in pending:  # exactly once, whatever Ray re-executes
                pending.discard(shard)
                merger.merge(shard, report)
                bar.update(1)
    except ray.exceptions.RayError as exc:
        raise RayEngineError(f"the Ray pipeline failed; {len(pending)} shards unfinished: {exc}") from exc
    finally:
        bar.close()
    if pending:
        raise RayEngineError(f"{len(pending)} shards never finished: {sorted(pending)[:10]}")


def ray_map_blocks(fn: Callable[..., str], args: Sequence[tuple]) -> list[str]:
    """:data:`index.ondisk.BlockMapper` on Ray: the per-block IVF adds as parallel tasks (retried when a
    worker dies; each writes its block tmp-then-rename, so a retry is idempotent)."""
    task = ray.remote(num_cpus=1, max_retries=DECODE_RETRIES)(fn)
    return ray.get([task.remote(*a) for a in args])


def build_index_ray(
    roots: Sequence[str | os.PathLike],
    index_dir: str | os.PathLike,
    encoder: Encoder,
    spec: dict,
    *,
    ray_address: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    encoders: int | None = None,
    decoders: int | None = None,
    from_list: str | os.PathLike | None = None,
    batch_size: int = 32,
    index_type: str | None = None,
    prune: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    throttle: float = 0.0,
    videos: bool = True,
    video_segments: float | None = None,
    max_video_seconds: float | None = DEFAULT_MAX_VIDEO_SECONDS,
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    seed: int | None = None,
    caption: bool = False,
    caption_prompt: str = "English caption:",
    caption_batch_size: int = 8,
    ondisk: bool | None = None,
) -> BuildReport:
    """Index ``roots`` (or the paths of ``from_list``) into ``index_dir`` on Ray; see the module docstring.

    ``encoder`` is loaded on the driver (name / dim checks and videos); ``spec`` (``model``, ``mode``,
    ``device``, ``dtype``) tells each actor how to load it. ``seed`` fixes the shuffle of the shards.
    ``ondisk`` (default: above :data:`index.ondisk.ONDISK_MIN_VECTORS` vectors) makes the final save
    train IVF once on a sample, add blocks of rows as parallel Ray tasks and ``merge_ondisk`` them into
    one ``.ivfdata`` file (:meth:`Index.save_ondisk`); index types that are not IVF at that size ignore it.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    if encoders is not None and encoders < 1 or decoders is not None and decoders < 1:
        raise ValueError("encoders and decoders must be >= 1")
    start = time.perf_counter()
    roots = resolve_roots(roots) if roots else []
    listed, list_errors = read_list(from_list, roots) if from_list is not None else (None, [])
    if listed is not None and prune:
        logger.warning("--prune is ignored with --from-list (a list does not say which files are gone)")
        prune = False
    index = open_or_create(index_dir, encoder, index_type)
    started = False

    def final_save(idx: Index) -> None:
        nonlocal started
        if not (ondisk if ondisk is not None else len(idx) > od.ONDISK_MIN_VECTORS):
            idx.save(full=True)
            return
        started = _connect(ray_address) or started
        idx.save_ondisk(map_blocks=ray_map_blocks)

    try:
        report = BuildReport()
        work = ShardDir(index.dir / SHARD_FOLDER).ensure()
        work.clean_temporaries()
        merger = ShardMerger(index, work)
        resumed = sorted(work.complete() - work.merged())
        for shard in resumed:  # finished by an earlier run that died before merging them
            merger.merge(shard, BuildReport(), verify=True)
        if resumed:
            logger.info("merged %d shards an earlier run finished", len(resumed))
        work.drop_unfinished()
        plan = plan_build(roots, index, report, videos=videos, video_segments=video_segments, listed=listed)
        report.scanned += len(list_errors)
        report.skipped_files.extend(list_errors)
        video_work = [w for w in plan.work if _is_video(w.relpath)]
        images = [w for w in plan.work if not _is_video(w.relpath)]
        items = [
            {"path": w.path, "size": w.size, "mtime": w.mtime_ns, "root": w.root, "relpath": w.relpath,
             "expect_hash": w.expect_hash}
            for w in images
        ]  # fmt: skip
        shards = work.write_manifests(items, shard_size, seed=seed)
        logger.info(
            "%d images in %d shards, %d videos on the driver", len(items), len(shards), len(video_work)
        )
        if shards:
            started = _connect(ray_address)
            _embed_shards(
                shards,
                work,
                merger,
                report,
                spec,
                encoders=encoders,
                decoders=decoders,
                batch_size=batch_size,
                max_pixels=max_pixels,
                progress=progress,
                throttle=throttle,
            )
        embed_videos(
            video_work,
            index,
            encoder,
            _Chunk(),
            report,
            throttle=throttle,
            video_segments=video_segments,
            max_video_seconds=max_video_seconds,
            max_pixels=max_pixels,
            max_video_bytes=max_video_bytes,
            batch_size=batch_size,
        )
        # captions (if asked) run on the driver, after the merge
        finish_build(
            index, plan, report, start, prune=prune, encoder=encoder, caption=caption,
            caption_prompt=caption_prompt, caption_batch_size=caption_batch_size, max_pixels=max_pixels,
            progress=progress, final_save=final_save,
        )  # fmt: skip
        work.clean_temporaries()
    finally:
        index.close()
        if started:
            ray.shutdown()
    return report


def shard_folder(index_dir: str | os.PathLike) -> Path:
    """Where a Ray build keeps its shards (clip-retrieval layout) for ``index_dir``."""
    return Path(index_dir) / SHARD_FOLDER
