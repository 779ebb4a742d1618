"""Metadata filters: a :class:`SearchFilters` -> an SQL condition on ``images`` -> the matching ids -> a
FAISS ``IDSelector``, so that the filter runs inside the vector search (a filter keeping 1 % of the rows
still yields ``k`` results when ``k`` rows match).

All conditions combine with AND; an unset field does not filter. ``path_prefix`` and ``path_glob`` match the
row's absolute ``path`` or its ``relpath`` (relative to the indexed folder); ``path_glob`` is SQLite ``GLOB``
(``*`` also crosses ``/``, case-sensitive). ``extensions`` compare case-insensitively, with or without the
dot. ``kinds``: ``image``, ``video``, ``segment`` (rows written before videos existed are images).
``mtime_from`` / ``mtime_to`` are Unix seconds, both inclusive; rows without a recorded mtime, width or
height never match a filter on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from index.faiss_index import faiss

#: the absolute path of a row in SQL (``os.path.join(root, relpath)``)
PATH_SQL = "(CASE WHEN substr(root, -1) = '/' THEN root || relpath ELSE root || '/' || relpath END)"
KIND_SQL = "coalesce(json_extract(extra, '$.kind'), 'image')"
KINDS = ("image", "video", "segment")


@dataclass(frozen=True)
class SearchFilters:
    """Row conditions, combined with AND (see the module docstring)."""

    path_prefix: str | None = None
    path_glob: str | None = None
    extensions: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    mtime_from: float | None = None
    mtime_to: float | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    ids: tuple[int, ...] | None = None

    @classmethod
    def coerce(cls, value: SearchFilters | Mapping[str, Any] | None) -> SearchFilters | None:
        """``value`` as filters (a mapping of the field names, ``None`` values ignored); ``None`` when it
        filters nothing. Unknown names or kinds raise ``ValueError``."""
        if value is None or isinstance(value, SearchFilters):
            return value if value is not None and not value.is_empty() else None
        names = {f.name for f in fields(cls)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"unknown filter fields: {sorted(unknown)}")
        kwargs = {k: v for k, v in value.items() if v is not None}
        for key in ("extensions", "kinds", "ids"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        made = cls(**kwargs)
        bad = set(made.kinds or ()) - set(KINDS)
        if bad:
            raise ValueError(f"unknown kinds {sorted(bad)}; expected some of {KINDS}")
        return None if made.is_empty() else made

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def where_sql(filters: SearchFilters | None) -> tuple[str, list[Any]]:
    """The SQL condition on ``images`` columns (``"1"`` for no filter) and its parameters."""
    if filters is None:
        return "1", []
    parts: list[str] = []
    params: list[Any] = []
    if filters.path_prefix is not None:
        prefix = filters.path_prefix
        parts.append(f"(substr({PATH_SQL}, 1, length(?)) = ? OR substr(relpath, 1, length(?)) = ?)")
        params += [prefix, prefix, prefix, prefix]
    if filters.path_glob is not None:
        parts.append(f"({PATH_SQL} GLOB ? OR relpath GLOB ?)")
        params += [filters.path_glob, filters.path_glob]
    if filters.extensions is not None:
        suffixes = sorted({"." + e.lower().lstrip(".") for e in filters.extensions})
        parts.append("(" + " OR ".join("substr(lower(relpath), -length(?)) = ?" for _ in suffixes) + ")")
        for suffix in suffixes:
            params += [suffix, suffix]
    if filters.kinds is not None:
        parts.append(f"{KIND_SQL} IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(sorted(set(filters.kinds))))
    if filters.mtime_from is not None:
        parts.append("mtime_ns >= ?")
        params.append(_ns(filters.mtime_from, ceil=True))
    if filters.mtime_to is not None:
        parts.append("mtime_ns <= ?")
        params.append(_ns(filters.mtime_to, ceil=False))
    for name, column, op in (
        ("min_width", "width", ">="),
        ("max_width", "width", "<="),
        ("min_height", "height", ">="),
        ("max_height", "height", "<="),
    ):
        value = getattr(filters, name)
        if value is not None:
            parts.append(f"{column} {op} ?")
            params.append(int(value))
    if filters.ids is not None:
        parts.append("id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(sorted({int(i) for i in filters.ids if -(2**63) <= int(i) < 2**63})))
    return " AND ".join(parts) or "1", params


def _ns(seconds: float, *, ceil: bool) -> int:
    """Unix seconds as integer nanoseconds, clamped to SQLite's 64-bit range."""
    ns = float(seconds) * 1e9
    value = int(np.ceil(ns)) if ceil else int(np.floor(ns))
    return max(-(2**63), min(2**63 - 1, value))


def resolve(store: Any, filters: SearchFilters, gen: int) -> np.ndarray:
    """``(n, 3)`` int64 ``[id, seg, off]`` of the rows visible at ``gen`` that pass ``filters``, by id."""
    where, params = where_sql(filters)
    sql = (
        "SELECT id, seg, off FROM images WHERE gen_added <= ? AND (gen_removed IS NULL OR gen_removed > ?)"
        f" AND {where} ORDER BY id"
    )
    rows = store.conn().execute(sql, (gen, gen, *params)).fetchall()
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


#: ids below this use a bitmap selector (at most 64 MiB, O(1) membership, fast to build); others a hash set
BITMAP_MAX_ID = 1 << 29


class IdSelector:
    """A FAISS ``IDSelector`` over non-negative ``ids`` that keeps its arrays alive as long as itself:
    ``IDSelectorBitmap`` for ids below :data:`BITMAP_MAX_ID`, else ``IDSelectorBatch``."""

    def __init__(self, ids: Sequence[int] | np.ndarray) -> None:
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        top = int(self.ids.max()) if len(self.ids) else 0
        if 0 <= top < BITMAP_MAX_ID and (not len(self.ids) or int(self.ids.min()) >= 0):
            bits = np.zeros(top + 1, dtype=bool)
            bits[self.ids] = True
            # bit (id & 7) of byte (id >> 3), as IDSelectorBitmap::is_member reads it
            self.bitmap = np.packbits(bits, bitorder="little")
            self.sel = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))
        else:
            self.sel = faiss.IDSelectorBatch(len(self.ids), faiss.swig_ptr(self.ids))
