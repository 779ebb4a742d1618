"""``manifest.json``: what an index holds (format, model, dim, metric, type) and its committed generation.

The manifest is written last in every save (temp file, fsync, rename), so it is the commit point:
whatever it names is complete on disk. The API reloads an index when this file changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from index.vectors import atomic_write

FORMAT = "internvl-retrieval-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class IndexFormatError(ValueError):
    """The directory is not an index of this format / version, or its files are inconsistent."""


class IndexMismatchError(ValueError):
    """The index was built with another model, mode or embedding dimension."""


class IndexLockedError(RuntimeError):
    """Another process holds the index's writer lock."""


def new_manifest(
    dim: int,
    metric: str,
    model: str | None,
    mode: str | None,
    index_type: str,
    memory_budget: int,
    factory: str,
    faiss_file: str,
) -> dict:
    """Manifest of an empty index (generation 0)."""
    now = time.time()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "mode": mode,
        "embed_dim": int(dim), "metric": metric, "index_type": index_type,
        "memory_budget": int(memory_budget), "vector_dtype": "float16", "generation": 0, "count": 0,
        "faiss_factory": factory,
        "faiss_file": faiss_file, "faiss_generation": 0, "faiss_count": 0, "next_segment": 0,
        "created_at": now, "updated_at": now,
    }  # fmt: skip


def write_manifest(folder: Path, manifest: dict) -> None:
    """Atomically replace ``folder/manifest.json`` (the commit point of a save)."""
    data = json.dumps(manifest, indent=1).encode()
    atomic_write(Path(folder) / MANIFEST, lambda fh: fh.write(data))


def read_manifest(folder: Path) -> dict:
    """The manifest of the index in ``folder``; clear errors for a missing, foreign or newer format."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no index at {folder} ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{folder}: index format version {manifest.get('format_version')} is not supported "
            f"(this code reads version {FORMAT_VERSION}); rebuild the index"
        )
    return manifest


def check_compatible(
    manifest: dict, folder: Path, *, model: str | None = None, dim: int | None = None, mode: str | None = None
) -> None:
    """Raise :class:`IndexMismatchError` when a given model / mode / dim differs from the manifest's."""
    checks = (("model", model, manifest.get("model")), ("mode", mode, manifest.get("mode")),
              ("embedding dim", dim, manifest.get("embed_dim")))  # fmt: skip
    for what, want, have in checks:
        if want is not None and have is not None and want != have:
            raise IndexMismatchError(
                f"index at {folder} was built with {what} {have!r}, not {want!r}; "
                "use another index directory or rebuild it"
            )
