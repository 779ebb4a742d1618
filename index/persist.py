"""Write side of the :class:`~index.index.Index`: atomic saves, FAISS rebuilds, clean-up.

Order of a save: new vector segment (+ merged segment) -> SQLite rows (already committed, tagged
``generation + 1``) -> FAISS file when due -> ``manifest.json`` (the commit point) -> clean-up of
what no reader of the current or previous generation needs. Each file is written to a temp name,
fsynced and renamed, so a crash at any instant leaves the previous or the new index.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from index import faiss_index as fx
from index import maintenance, ondisk
from index.manifest import write_manifest
from index.state import IndexState

logger = logging.getLogger(__name__)


class Saver:
    """Commits the changes held by an :class:`IndexState` (the caller holds its lock as the writer).

    :meth:`save` and :meth:`save_ondisk` return the FAISS file of the generation they replaced (what the
    clean-up keeps for its readers), or None when nothing was committed; the ``Index`` then cleans up.
    """

    def __init__(self, state: IndexState) -> None:
        self.state = state

    def factory(self) -> str:
        """The FAISS structure the index type calls for at the current row count."""
        s = self.state
        return fx.choose_factory(
            s.manifest["index_type"],
            s.count,
            s.dim,
            int(s.manifest.get("memory_budget", fx.DEFAULT_MEMORY_BUDGET)),
        )

    def save(self, full: bool, keep_structure: bool = False) -> str | None:
        """Commit all changes (see :meth:`index.index.Index.save`)."""
        s = self.state
        factory = self.factory()
        if keep_structure and not full:
            factory = s.factory
        if not (s.changed or factory != s.factory or s.rebuild_needed or (full and s.delta)):
            return None
        new_gen = s.gen + 1
        pending = s.pending.as_map()
        next_seg = s.pending.seg
        if pending is not None:
            s.vectors.write(s.pending.seg, pending[s.pending.seg])
            next_seg += 1
        merge = maintenance.plan_merge(s.store.segment_live_counts())
        if merge:
            maintenance.merge_segments(s.store, s.vectors, merge, next_seg, s.view, pending)
            next_seg += 1
        manifest = dict(s.manifest)
        write_faiss = (
            full
            or factory != s.factory
            or s.rebuild_needed
            or s.delta >= max(4096, int(manifest["faiss_count"]) // 2)
        )
        # ids the FAISS index cannot remove (HNSW) must not reach a written file
        if factory != s.factory or s.rebuild_needed or (write_faiss and s.dead):
            s.faiss = maintenance.rebuild_faiss(s.store, s.vectors, s.view, factory, s.dim, s.metric, pending)
            s.factory, s.dead, s.rebuild_needed = factory, set(), False
            s.apply_search_params()
        if write_faiss:
            name = f"faiss/{new_gen:08d}.faiss"
            s.faiss = ondisk.to_memory(s.faiss)  # never a second reference to an old .ivfdata
            fx.write(s.faiss, s.dir / name)
            manifest.update(
                faiss_file=name,
                faiss_generation=new_gen,
                faiss_factory=s.factory,
                faiss_count=int(s.faiss.ntotal),
            )
        manifest.update(generation=new_gen, count=s.count, next_segment=next_seg, updated_at=time.time())
        write_manifest(s.dir, manifest)  # the commit point
        previous = s.manifest
        s.manifest, s.gen = manifest, new_gen
        s.pending.reset(next_seg)
        s.changed = False
        if write_faiss:
            s.delta = 0
        logger.debug("saved %s generation %d (%d rows)", s.dir, new_gen, s.count)
        return previous.get("faiss_file")

    def save_ondisk(self, factory: str, map_blocks: ondisk.BlockMapper, seed: int) -> str | None:
        """Write the FAISS index as an on-disk IVF of ``factory`` (nothing pending): train, add blocks,
        merge, commit (see :meth:`index.index.Index.save_ondisk`)."""
        s = self.state
        if not s.delta and s.factory == factory and ondisk.is_ondisk(s.faiss):
            return None  # already on disk and up to date (a re-run with nothing new)
        live = s.store.live_locations(s.view)
        locs = [(seg, off) for _, seg, off in live]
        trained = fx.new_index(
            factory,
            s.dim,
            s.metric,
            maintenance.train_sample(s.vectors, locs, factory, s.dim, s.metric, None, seed),
        )
        new_gen = s.gen + 1
        name = f"faiss/{new_gen:08d}.faiss"
        work = Path(tempfile.mkdtemp(prefix=".ivf-blocks-", dir=s.dir))  # shared storage for Ray workers
        try:
            trained_path, folder = str(work / "trained.index"), str(s.vectors.folder)
            fx.faiss.write_index(trained, trained_path)
            args = [
                (trained_path, folder, s.dim, ids, where, str(work / f"block-{k:06d}.index"))
                for k, (ids, where) in enumerate(ondisk.blocks(live))
            ]
            paths = map_blocks(ondisk.add_block, args)
            merged = ondisk.merge_blocks(trained, paths, s.dir / ondisk.companion(name))
            fx.write(merged, s.dir / name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        manifest = dict(s.manifest)
        manifest.update(
            faiss_file=name,
            faiss_generation=new_gen,
            faiss_factory=factory,
            faiss_count=int(merged.ntotal),
            generation=new_gen,
            count=s.count,
            updated_at=time.time(),
        )
        write_manifest(s.dir, manifest)  # the commit point
        previous = s.manifest
        s.manifest, s.gen = manifest, new_gen
        s.faiss = fx.read(s.dir / name)  # mapped read-only, as readers see it
        s.factory, s.dead, s.rebuild_needed, s.delta = factory, set(), False, 0
        s.apply_search_params()
        logger.info("%s: on-disk IVF %s, %d vectors, %d blocks", s.dir, factory, merged.ntotal, len(paths))
        return previous.get("faiss_file")

    def cleanup(self, keep_faiss: str | None = None) -> None:
        """Drop what no reader of the current or previous generation can need any more."""
        s = self.state
        s.store.purge(min(s.gen - 2, int(s.manifest["faiss_generation"])))
        in_use = s.store.segments_in_use() | {s.pending.seg}
        s.vectors.delete(sorted(s.vectors.existing() - in_use))
        keep = {s.manifest["faiss_file"], keep_faiss} - {None}
        keep |= {ondisk.companion(f) for f in keep}
        for path in (s.dir / "faiss").iterdir():
            if f"faiss/{path.name}" not in keep:
                path.unlink(missing_ok=True)
