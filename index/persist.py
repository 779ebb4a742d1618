"""Write side of the :class:`~index.index.Index`: atomic saves, FAISS rebuilds, clean-up.

Order of a save: new vector segment (+ merged segment) -> SQLite rows (already committed, tagged
``generation + 1``) -> FAISS file when due -> ``manifest.json`` (the commit point) -> clean-up of
what no reader of the current or previous generation needs. Each file is written to a temp name,
fsynced and renamed, so a crash at any instant leaves the previous or the new index.
"""

from __future__ import annotations

import logging
import os
import time

from index import faiss_index as fx
from index import maintenance
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
        keep = {self._manifest["faiss_file"], keep_faiss}
        for path in (self.dir / "faiss").iterdir():
            if f"faiss/{path.name}" not in keep:
                path.unlink(missing_ok=True)
