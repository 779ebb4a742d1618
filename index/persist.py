"""Write side of the :class:`~index.index.Index`: atomic saves, FAISS rebuilds, clean-up.

Order of a save: new vector segment (+ merged segment) -> SQLite rows (already committed, tagged
``generation + 1``) -> FAISS file when due -> ``manifest.json`` (the commit point) -> clean-up of
what no reader of the current or previous generation needs. Each file is written to a temp name,
fsynced and renamed, so a crash at any instant leaves the previous or the new index.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from index import faiss_index as fx
from index import maintenance, ondisk
from index.manifest import read_manifest, write_manifest

logger = logging.getLogger(__name__)


class SaveMixin:
    """``save`` / ``rebuild``; the state they change is set up by ``Index``."""

    def save(self, *, full: bool = False, keep_structure: bool = False) -> None:
        """Commit all changes atomically (vectors, rows, FAISS, then the manifest last).

        The FAISS file is rewritten when the pending delta has grown large, when the index type
        calls for another structure (e.g. ``auto`` crossing to IVF, IVF lists outgrown), or with
        ``full=True``; otherwise readers replay the small delta from SQLite on open.
        ``keep_structure`` (bulk loads) keeps the current FAISS structure, so that a later
        ``save(full=True)`` trains the final one once on a sample of everything added.
        """
        with self._lock:
            if not self._writer:
                self._acquire_writer()
            try:
                self._save(full, keep_structure)
            except BaseException:
                logger.error("saving %s failed: its unsaved changes are dropped", self.dir)
                self._reset()
                raise

    def _reset(self) -> None:
        """Back to the last committed state (after a failed save), as a reader."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._writer = False
        self.vectors.forget()
        try:
            self._load(read_manifest(self.dir))
        except (OSError, ValueError) as exc:
            logger.error("cannot reload %s: %s", self.dir, exc)

    def _save(self, full: bool, keep_structure: bool = False) -> None:
        """The body of :meth:`save` (lock held)."""
        factory = fx.choose_factory(
            self._manifest["index_type"],
            self._count,
            self.dim,
            int(self._manifest.get("memory_budget", fx.DEFAULT_MEMORY_BUDGET)),
        )
        if keep_structure and not full:
            factory = self._factory
        if not (self._changed or factory != self._factory or self._rebuild_needed or (full and self._delta)):
            return
        new_gen = self._gen + 1
        pending = self._pending.as_map()
        next_seg = self._pending.seg
        if pending is not None:
            self.vectors.write(self._pending.seg, pending[self._pending.seg])
            next_seg += 1
        merge = maintenance.plan_merge(self.store.segment_live_counts())
        if merge:
            maintenance.merge_segments(self.store, self.vectors, merge, next_seg, self._view, pending)
            next_seg += 1
        manifest = dict(self._manifest)
        write_faiss = (
            full
            or factory != self._factory
            or self._rebuild_needed
            or self._delta >= max(4096, int(manifest["faiss_count"]) // 2)
        )
        # ids the FAISS index cannot remove (HNSW) must not reach a written file
        if factory != self._factory or self._rebuild_needed or (write_faiss and self._dead):
            self._faiss = maintenance.rebuild_faiss(
                self.store, self.vectors, self._view, factory, self.dim, self.metric, pending
            )
            self._factory, self._dead, self._rebuild_needed = factory, set(), False
            self._apply_search_params()
        if write_faiss:
            name = f"faiss/{new_gen:08d}.faiss"
            self._faiss = ondisk.to_memory(self._faiss)  # never a second reference to an old .ivfdata
            fx.write(self._faiss, self.dir / name)
            manifest.update(
                faiss_file=name,
                faiss_generation=new_gen,
                faiss_factory=self._factory,
                faiss_count=int(self._faiss.ntotal),
            )
        manifest.update(generation=new_gen, count=self._count, next_segment=next_seg, updated_at=time.time())
        write_manifest(self.dir, manifest)  # the commit point
        previous = self._manifest
        self._manifest, self._gen = manifest, new_gen
        self._pending.reset(next_seg)
        self._changed = False
        if write_faiss:
            self._delta = 0
        self._cleanup(previous.get("faiss_file"))
        logger.debug("saved %s generation %d (%d rows)", self.dir, new_gen, self._count)

    def save_ondisk(self, *, map_blocks: ondisk.BlockMapper | None = None, seed: int = 0) -> bool:
        """Commit, then write the FAISS index as an on-disk IVF (see :mod:`index.ondisk`); True when done.

        IVF is trained once on the sample :meth:`rebuild` would draw (``seed``), so the result searches as
        the in-memory IVF; ``map_blocks`` runs the per-block adds (default: in this process; the Ray engine
        runs them as parallel tasks). Index types that are not IVF at this size get ``save(full=True)``.
        """
        with self._lock:
            self._acquire_writer()
            self.save(keep_structure=True)
            factory = fx.choose_factory(
                self._manifest["index_type"],
                self._count,
                self.dim,
                int(self._manifest.get("memory_budget", fx.DEFAULT_MEMORY_BUDGET)),
            )
            if not factory.startswith("IVF"):
                logger.info("%s: %s is not an IVF index, saving it in memory", self.dir, factory)
                self.save(full=True)
                return False
            try:
                self._save_ondisk(factory, map_blocks or ondisk.run_local, seed)
            except BaseException:
                logger.error("on-disk save of %s failed: the index keeps its previous FAISS file", self.dir)
                self._reset()
                raise
            return True

    def _save_ondisk(self, factory: str, map_blocks: ondisk.BlockMapper, seed: int) -> None:
        """The body of :meth:`save_ondisk` (lock held, nothing pending): train, add blocks, merge, commit."""
        if not self._delta and self._factory == factory and ondisk.is_ondisk(self._faiss):
            return  # already on disk and up to date (a re-run with nothing new)
        live = self.store.live_locations(self._view)
        locs = [(s, o) for _, s, o in live]
        trained = fx.new_index(
            factory,
            self.dim,
            self.metric,
            maintenance.train_sample(self.vectors, locs, factory, self.dim, self.metric, None, seed),
        )
        new_gen = self._gen + 1
        name = f"faiss/{new_gen:08d}.faiss"
        work = Path(tempfile.mkdtemp(prefix=".ivf-blocks-", dir=self.dir))  # shared storage for Ray workers
        try:
            trained_path, folder = str(work / "trained.index"), str(self.vectors.folder)
            fx.faiss.write_index(trained, trained_path)
            args = [
                (trained_path, folder, self.dim, ids, where, str(work / f"block-{k:06d}.index"))
                for k, (ids, where) in enumerate(ondisk.blocks(live))
            ]
            paths = map_blocks(ondisk.add_block, args)
            merged = ondisk.merge_blocks(trained, paths, self.dir / ondisk.companion(name))
            fx.write(merged, self.dir / name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        manifest = dict(self._manifest)
        manifest.update(
            faiss_file=name,
            faiss_generation=new_gen,
            faiss_factory=factory,
            faiss_count=int(merged.ntotal),
            generation=new_gen,
            count=self._count,
            updated_at=time.time(),
        )
        write_manifest(self.dir, manifest)  # the commit point
        previous = self._manifest
        self._manifest, self._gen = manifest, new_gen
        self._faiss = fx.read(self.dir / name)  # mapped read-only, as readers see it
        self._factory, self._dead, self._rebuild_needed, self._delta = factory, set(), False, 0
        self._apply_search_params()
        self._cleanup(previous.get("faiss_file"))
        logger.info("%s: on-disk IVF %s, %d vectors, %d blocks", self.dir, factory, merged.ntotal, len(paths))

    def rebuild(self, index_type: str | None = None) -> None:
        """Rebuild (and retrain) the FAISS index from the stored vectors, optionally changing its type."""
        with self._lock:
            self._acquire_writer()
            if index_type is not None:
                fx.choose_factory(index_type, 0, self.dim)  # validates the name
                self._manifest = {**self._manifest, "index_type": index_type}
                self._changed = True
            self._rebuild_needed = True
            self.save(full=True)

    def _cleanup(self, keep_faiss: str | None = None) -> None:
        """Drop what no reader of the current or previous generation can need any more."""
        self.store.purge(min(self._gen - 2, int(self._manifest["faiss_generation"])))
        in_use = self.store.segments_in_use() | {self._pending.seg}
        self.vectors.delete(sorted(self.vectors.existing() - in_use))
        keep = {self._manifest["faiss_file"], keep_faiss} - {None}
        keep |= {ondisk.companion(f) for f in keep}
        for path in (self.dir / "faiss").iterdir():
            if f"faiss/{path.name}" not in keep:
                path.unlink(missing_ok=True)
