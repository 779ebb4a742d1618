"""Folder walking and change detection against the rows already in the index."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.images import supported_extensions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    """One image file found under ``root`` (``root`` is absolute and symlink-resolved)."""

    root: str
    relpath: str
    size: int
    mtime_ns: int

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)


def resolve_roots(roots: Iterable[str | os.PathLike]) -> list[str]:
    """Absolute, resolved, de-duplicated roots; a root inside another root is dropped."""
    resolved = []
    for root in roots:
        path = Path(root).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"folder not found: {root}")
        if not path.is_dir():
            raise NotADirectoryError(f"not a folder: {root}")
        resolved.append(str(path))
    out: list[str] = []
    for path in sorted(set(resolved), key=len):
        if any(_inside(path, kept) for kept in out):
            logger.info("%s is inside another root; walked once", path)
            continue
        out.append(path)
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


OnError = Callable[[str, str, str], None]


def walk(
    roots: list[str],
    on_error: OnError | None = None,
    extensions: frozenset[str] | None = None,
    *,
    within: list[str] | None = None,
    seen: set[tuple[int, int]] | None = None,
) -> Iterator[FileEntry]:
    """Image files under resolved ``roots``, recursively, in sorted order.

    Symlinks are followed only when their target lies inside one of ``within`` (default: ``roots``);
    every folder is walked once (``seen`` holds visited folders, shareable between calls), which cuts
    cycles and duplicate paths; unreadable folders are reported through ``on_error(path, reason, message)``.
    """
    exts = extensions if extensions is not None else supported_extensions()
    within = roots if within is None else within
    seen = set() if seen is None else seen
    for root in roots:
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if on_error is not None:
                    on_error(folder, "unreadable", f"cannot list folder: {exc}")
                continue
            subdirs = []
            for entry in entries:
                if entry.is_symlink() and not any(_inside(os.path.realpath(entry.path), r) for r in within):
                    logger.debug("not following symlink outside the roots: %s", entry.path)
                    continue
                try:
                    if entry.is_dir():
                        subdirs.append(entry.path)
                    elif os.path.splitext(entry.name)[1].lower() not in exts:
                        continue
                    elif entry.is_file():
                        st = entry.stat()
                        yield FileEntry(root, os.path.relpath(entry.path, root), st.st_size, st.st_mtime_ns)
                    elif entry.is_symlink() and on_error is not None:
                        on_error(entry.path, "unreadable", "dangling symlink")
                except OSError as exc:  # broken symlink, entry vanished, ...
                    if on_error is not None:
                        on_error(entry.path, "unreadable", str(exc))
            stack.extend(reversed(subdirs))


@dataclass
class WorkItem:
    """A file to read: ``old_id`` is the row it replaces, ``expect_hash`` set when only mtime changed."""

    root: str
    relpath: str
    old_id: int | None = None
    expect_hash: str | None = None
    old_parts: list[int] = field(default_factory=list)  #: the old row's segment rows (videos)
    size: int | None = None  #: as walked (the shard manifests of the Ray engine carry it)
    mtime_ns: int | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)


@dataclass
class Plan:
    """What a build run has to do for one set of roots."""

    scanned: int = 0
    work: list[WorkItem] = field(default_factory=list)
    unchanged: int = 0
    known_bad: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, message)
    deleted: list[int] = field(default_factory=list)  # ids whose files are gone


def plan_root(
    entries: Iterable[FileEntry],
    existing: dict[str, tuple[int, int, int, str]],
    failures: dict[str, tuple[int, int, str, str]],
    plan: Plan,
    parts: dict[str, list[int]] | None = None,
    stale: Container[str] = (),
) -> None:
    """Compare one root's files with its rows: unchanged (same size and mtime) files are skipped,
    same size but new mtime is re-checked by content hash, anything else is (re-)read.

    ``parts`` maps a relpath to its extra (segment) row ids, replaced or deleted with the file's row;
    relpaths in ``stale`` are re-read even when unchanged (e.g. built with other segment settings)."""
    parts = parts or {}
    seen = set()
    for e in entries:
        plan.scanned += 1
        seen.add(e.relpath)
        stat = {"size": e.size, "mtime_ns": e.mtime_ns}
        known = existing.get(e.relpath)
        if known is not None:
            rid, size, mtime_ns, digest = known
            old_parts = list(parts.get(e.relpath, ()))
            if e.relpath in stale:
                plan.work.append(WorkItem(e.root, e.relpath, rid, old_parts=old_parts, **stat))
            elif size == e.size and mtime_ns == e.mtime_ns:
                plan.unchanged += 1
            elif size == e.size and digest:
                plan.work.append(WorkItem(e.root, e.relpath, rid, digest, old_parts, **stat))
            else:
                plan.work.append(WorkItem(e.root, e.relpath, rid, old_parts=old_parts, **stat))
            continue
        bad = failures.get(e.relpath)
        if bad is not None and bad[:2] == (e.size, e.mtime_ns) and bad[2] != "unreadable":
            plan.known_bad.append((e.path, bad[2], bad[3]))
            continue
        plan.work.append(WorkItem(e.root, e.relpath, **stat))
    for rel, (rid, *_rest) in existing.items():
        if rel not in seen:
            plan.deleted.extend([rid, *parts.get(rel, ())])
    # segment rows whose file row is gone (cannot happen through the builder; cleaned up anyway)
    plan.deleted.extend(
        i for rel, ids in parts.items() if rel not in existing and rel not in seen for i in ids
    )
