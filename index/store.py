"""SQLite metadata store (WAL) with generation-tagged rows.

Every row carries ``gen_added`` and ``gen_removed``. A reader pinned to generation ``G`` (the one in
``manifest.json``) sees exactly the rows with ``gen_added <= G`` and ``gen_removed`` unset or ``> G``,
so a writer can commit rows for generation ``G + 1`` before the manifest names it, and a crash
between the two is undone by :meth:`MetaStore.rollback_after`.

Schema version 2 (``meta.schema_version``) adds ``part``: 0 for an image or a whole video, ``k + 1`` for
segment ``k`` of a video, so one path can hold several live rows (unique on ``(root, relpath, part)``).
Schema version 3 adds ``caption`` (a generated caption, NULL until one is stored) and ``images_fts``, an
FTS5 table (``tokenize='trigram'``: substrings of 3+ characters in any script, Chinese and Japanese included)
over each row's file name, relative path and caption, kept in step with ``images`` by triggers.
Older databases (version 1 has no ``schema_version``) are migrated in place by :meth:`MetaStore.migrate`,
which the index calls once it holds the writer lock; readers of an unmigrated database see no captions
and keyword search falls back to ``LIKE`` (:mod:`index.keyword`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    root TEXT,
    relpath TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    hash TEXT,
    width INTEGER,
    height INTEGER,
    added_at REAL NOT NULL,
    seg INTEGER NOT NULL,
    off INTEGER NOT NULL,
    gen_added INTEGER NOT NULL,
    gen_removed INTEGER,
    extra TEXT,
    part INTEGER NOT NULL DEFAULT 0,
    caption TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS images_live_part ON images(root, relpath, part) WHERE gen_removed IS NULL;
CREATE INDEX IF NOT EXISTS images_removed ON images(gen_removed) WHERE gen_removed IS NOT NULL;
CREATE INDEX IF NOT EXISTS images_added ON images(gen_added);
CREATE INDEX IF NOT EXISTS images_seg ON images(seg);
CREATE TABLE IF NOT EXISTS failures (
    root TEXT NOT NULL, relpath TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
    reason TEXT NOT NULL, message TEXT, PRIMARY KEY (root, relpath)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '3');
"""

#: the file name of ``relpath`` in SQL (what follows the last '/'), with ``{r}`` the column reference
_BASENAME = "substr({r}, length(rtrim({r}, replace({r}, '/', ''))) + 1)"
#: schema 3: full-text table over file name, relative path and caption, and the triggers that maintain it
FTS_SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS images_fts USING fts5(name, relpath, caption, tokenize='trigram');
CREATE TRIGGER IF NOT EXISTS images_fts_insert AFTER INSERT ON images BEGIN
    INSERT INTO images_fts(rowid, name, relpath, caption)
    VALUES (new.id, {_BASENAME.format(r="new.relpath")}, new.relpath, new.caption);
END;
CREATE TRIGGER IF NOT EXISTS images_fts_delete AFTER DELETE ON images BEGIN
    DELETE FROM images_fts WHERE rowid = old.id;
END;
CREATE TRIGGER IF NOT EXISTS images_fts_update AFTER UPDATE OF relpath, caption ON images BEGIN
    UPDATE images_fts SET name = {_BASENAME.format(r="new.relpath")}, relpath = new.relpath,
        caption = new.caption WHERE rowid = new.id;
END;
"""

#: version of the SQLite schema this code writes (1: no ``part`` column, one live row per path;
#: 2: no ``caption`` column nor ``images_fts``)
SCHEMA_VERSION = 3

#: metadata columns a row dict may set (``path`` is split into root/relpath)
ROW_FIELDS = ("root", "relpath", "size", "mtime_ns", "hash", "width", "height")
_COLUMNS = "id, root, relpath, size, mtime_ns, hash, width, height, added_at, seg, off, extra, caption"
#: the same for a schema-2 database that has not been migrated yet (read-only users)
_COLUMNS_V2 = _COLUMNS.replace(", caption", ", NULL AS caption")
_VISIBLE = "gen_added <= ? AND (gen_removed IS NULL OR gen_removed > ?)"
_CHUNK = 900  # stay below SQLite's bound-parameter limit
_DERIVED = ("id", "path", "score", "added_at", "part", "caption")


def _statements(script: str) -> list[str]:
    """The statements of a schema script (triggers hold ``;`` inside ``BEGIN ... END;``)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.endswith("END;")):
            out.append(text)
            current = []
    return out


def _sql_ids(ids: Iterable[int]) -> list[int]:
    """Ids as Python ints; values outside SQLite's 64-bit range cannot exist and are dropped."""
    return [int(i) for i in ids if -(2**63) <= int(i) < 2**63]


def _coerce(key: str, value: object) -> object:
    """Plain Python values for SQLite (numpy integers, Path objects)."""
    if value is None:
        return None
    return str(value) if key in ("root", "relpath", "hash") else int(value)


def _row_dict(rec: tuple) -> dict:
    rid, root, rel, size, mtime_ns, digest, width, height, added_at, _seg, _off, extra, caption = rec
    path = os.path.join(root, rel) if rel is not None else None
    row = {
        "id": int(rid),
        "path": path,
        "root": root,
        "relpath": rel,
        "size": size,
        "mtime_ns": mtime_ns,
        "hash": digest,
        "width": width,
        "height": height,
        "added_at": added_at,
    }
    if extra:
        row.update(json.loads(extra))
    row["caption"] = caption
    return row


class MetaStore:
    """Thread-safe access to ``meta.sqlite``: one connection per thread, WAL journal."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FileNotFoundError(f"index metadata database missing: {self.path}")
        self._local = threading.local()
        conn = self.conn()
        conn.execute("PRAGMA journal_mode=WAL")
        if create:
            conn.executescript(SCHEMA + FTS_SCHEMA)
            conn.commit()
        self._has_captions: bool | None = None

    def has_captions(self) -> bool:
        """Whether the database has the schema-3 ``caption`` column and ``images_fts`` table."""
        if not self._has_captions:  # once True it stays True (migrations only add)
            conn = self.conn()
            columns = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
            fts = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'images_fts'").fetchone()
            self._has_captions = "caption" in columns and fts is not None
        return self._has_captions

    def _columns(self) -> str:
        return _COLUMNS if self.has_captions() else _COLUMNS_V2

    def schema_version(self) -> int:
        """1 for databases written before segment rows existed, else the stored version."""
        value = self.meta("schema_version")
        return int(value) if value is not None else 1

    def migrate(self) -> bool:
        """Upgrade a version-1 or -2 database to :data:`SCHEMA_VERSION` in one transaction (writer only).

        Returns True when something was migrated; a database newer than this code raises ``ValueError``.
        """
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: metadata schema {version} is newer than this code's {SCHEMA_VERSION}"
            )
        if version == SCHEMA_VERSION:
            return False
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
            if "part" not in columns:
                conn.execute("ALTER TABLE images ADD COLUMN part INTEGER NOT NULL DEFAULT 0")
            conn.execute("DROP INDEX IF EXISTS images_live_path")
            conn.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS images_live_part ON images(root, relpath, part)"
                " WHERE gen_removed IS NULL"
            )
            if "caption" not in columns:
                conn.execute("ALTER TABLE images ADD COLUMN caption TEXT")
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'images_fts'").fetchone() is None:
                for statement in _statements(FTS_SCHEMA):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO images_fts(rowid, name, relpath, caption) SELECT id,"
                    f" {_BASENAME.format(r='relpath')}, relpath, caption FROM images"
                )
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return True

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (created on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level="DEFERRED")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.conn = conn
        return conn

    # ----------------------------------------------------------------- reads (snapshot at `gen`)
    def get(self, ids: Sequence[int], gen: int) -> dict[int, dict]:
        """Visible rows by id at generation ``gen`` (missing ids are absent from the result)."""
        out: dict[int, dict] = {}
        ids = _sql_ids(ids)
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(part))
            sql = f"SELECT {self._columns()} FROM images WHERE id IN ({marks}) AND {_VISIBLE}"
            for rec in self.conn().execute(sql, (*part, gen, gen)):
                out[int(rec[0])] = _row_dict(rec)
        return out

    def locations(self, ids: Sequence[int], gen: int) -> dict[int, tuple[int, int]]:
        """``id -> (segment, offset)`` of the stored vector for visible ids."""
        out: dict[int, tuple[int, int]] = {}
        ids = _sql_ids(ids)
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(part))
            sql = f"SELECT id, seg, off FROM images WHERE id IN ({marks}) AND {_VISIBLE}"
            for rid, seg, off in self.conn().execute(sql, (*part, gen, gen)):
                out[int(rid)] = (int(seg), int(off))
        return out

    def count(self, gen: int) -> int:
        return int(
            self.conn().execute(f"SELECT COUNT(*) FROM images WHERE {_VISIBLE}", (gen, gen)).fetchone()[0]
        )

    def live_locations(self, gen: int) -> list[tuple[int, int, int]]:
        """All visible ``(id, seg, off)`` ordered by id."""
        sql = f"SELECT id, seg, off FROM images WHERE {_VISIBLE} ORDER BY id"
        return [(int(a), int(b), int(c)) for a, b, c in self.conn().execute(sql, (gen, gen))]

    def delta(self, since: int, gen: int) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Changes between generations: rows added in ``(since, gen]`` still visible at ``gen``, and
        ids visible at ``since`` that were removed in ``(since, gen]``."""
        added = (
            self.conn()
            .execute(
                f"SELECT id, seg, off FROM images WHERE gen_added > ? AND {_VISIBLE} ORDER BY id",
                (since, gen, gen),
            )
            .fetchall()
        )
        removed = (
            self.conn()
            .execute(
                "SELECT id FROM images WHERE gen_added <= ? AND gen_removed > ? AND gen_removed <= ?",
                (since, since, gen),
            )
            .fetchall()
        )
        return [(int(a), int(b), int(c)) for a, b, c in added], [int(r[0]) for r in removed]

    def by_root(self, root: str, gen: int) -> dict[str, tuple[int, int, int, str]]:
        """``relpath -> (id, size, mtime_ns, hash)`` for visible file rows (image / whole video) under
        ``root``; segment rows are in :meth:`parts_by_root`."""
        sql = (
            f"SELECT relpath, id, size, mtime_ns, hash FROM images WHERE root = ? AND part = 0 AND {_VISIBLE}"
        )
        return {r[0]: (int(r[1]), r[2], r[3], r[4]) for r in self.conn().execute(sql, (root, gen, gen))}

    def parts_by_root(self, root: str, gen: int) -> dict[str, list[int]]:
        """``relpath -> ids`` of the visible segment rows (``part > 0``) under ``root``."""
        sql = f"SELECT relpath, id FROM images WHERE root = ? AND part > 0 AND {_VISIBLE} ORDER BY part"
        out: dict[str, list[int]] = {}
        for rel, rid in self.conn().execute(sql, (root, gen, gen)):
            out.setdefault(rel, []).append(int(rid))
        return out

    def extras_by_root(self, root: str, gen: int, like: str) -> dict[str, dict]:
        """``relpath -> extra fields`` of visible file rows under ``root`` whose extra JSON holds ``like``."""
        sql = f"SELECT relpath, extra FROM images WHERE root = ? AND part = 0 AND extra LIKE ? AND {_VISIBLE}"
        rows = self.conn().execute(sql, (root, f"%{like}%", gen, gen))
        return {rel: json.loads(extra) for rel, extra in rows}

    def max_id(self) -> int:
        value = self.meta("next_id")
        top = self.conn().execute("SELECT MAX(id) FROM images").fetchone()[0]
        return max(int(value) - 1 if value is not None else -1, top if top is not None else -1)

    def meta(self, key: str) -> str | None:
        rec = self.conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return rec[0] if rec else None

    # ----------------------------------------------------------------------------------- writes
    def insert(
        self, ids: Sequence[int], rows: Sequence[dict], seg: int, offsets: Sequence[int], gen: int
    ) -> None:
        """Insert rows for generation ``gen`` (committed immediately; invisible to readers at < gen)."""
        now = time.time()
        records = []
        for rid, row, off in zip(ids, rows, offsets, strict=True):
            fields = [_coerce(k, row.get(k)) for k in ROW_FIELDS]
            extra = {k: v for k, v in row.items() if k not in ROW_FIELDS and k not in _DERIVED}
            try:
                extra_json = json.dumps(extra) if extra else None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"row fields must be JSON-serialisable: {exc}") from exc
            added_at = float(row.get("added_at", now))
            part = int(row.get("part") or 0)
            caption = row.get("caption")
            records.append(
                (int(rid), *fields, added_at, seg, int(off), gen, extra_json, part, caption and str(caption))
            )
        conn = self.conn()
        with conn:
            conn.executemany(
                "INSERT INTO images (id, root, relpath, size, mtime_ns, hash, width, height, added_at,"
                " seg, off, gen_added, extra, part, caption) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                records,
            )
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_id', ?)", (str(int(max(ids)) + 1),))

    def remove(self, ids: Iterable[int], gen: int) -> int:
        """Mark visible rows removed at ``gen``; rows added in ``gen`` itself are deleted outright."""
        ids = _sql_ids(ids)
        n = 0
        conn = self.conn()
        with conn:
            for start in range(0, len(ids), _CHUNK):
                part = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(part))
                n += conn.execute(
                    f"DELETE FROM images WHERE id IN ({marks}) AND gen_added >= ? AND gen_removed IS NULL",
                    (*part, gen),
                ).rowcount
                n += conn.execute(
                    f"UPDATE images SET gen_removed = ? WHERE id IN ({marks}) AND gen_removed IS NULL",
                    (gen, *part),
                ).rowcount
        return n

    def set_captions(self, captions: Iterable[tuple[int, str | None]]) -> int:
        """Store ``(id, caption)`` pairs (committed at once, like :meth:`touch`); returns rows changed."""
        pairs = [(None if c is None else str(c), int(i)) for i, c in captions]
        conn = self.conn()
        with conn:
            return conn.executemany("UPDATE images SET caption = ? WHERE id = ?", pairs).rowcount

    def uncaptioned(self, gen: int, limit: int = 1000, after: int = -1) -> list[dict]:
        """Up to ``limit`` visible file rows (images and whole videos, not segments) with id > ``after``
        that have no caption yet, by id."""
        sql = (
            f"SELECT {self._columns()} FROM images WHERE part = 0 AND caption IS NULL AND id > ?"
            f" AND {_VISIBLE} ORDER BY id LIMIT ?"
        )
        return [_row_dict(rec) for rec in self.conn().execute(sql, (int(after), gen, gen, int(limit)))]

    def uncaptioned_count(self, gen: int) -> int:
        sql = f"SELECT COUNT(*) FROM images WHERE part = 0 AND caption IS NULL AND {_VISIBLE}"
        return int(self.conn().execute(sql, (gen, gen)).fetchone()[0])

    def captioned_count(self, gen: int) -> int:
        if not self.has_captions():
            return 0
        sql = f"SELECT COUNT(*) FROM images WHERE caption IS NOT NULL AND {_VISIBLE}"
        return int(self.conn().execute(sql, (gen, gen)).fetchone()[0])

    def touch(self, updates: Sequence[tuple[int, int, int]]) -> None:
        """Refresh ``(id, size, mtime_ns)`` of rows whose content hash proved unchanged."""
        conn = self.conn()
        with conn:
            conn.executemany(
                "UPDATE images SET size = ?, mtime_ns = ? WHERE id = ?", [(s, m, i) for i, s, m in updates]
            )

    def move(self, moves: Sequence[tuple[int, int, int]]) -> None:
        """Point ``(id, seg, off)`` rows at a rewritten vector segment (same vectors)."""
        conn = self.conn()
        with conn:
            conn.executemany(
                "UPDATE images SET seg = ?, off = ? WHERE id = ?", [(s, o, i) for i, s, o in moves]
            )

    def rollback_after(self, gen: int) -> int:
        """Undo everything tagged with a generation newer than ``gen`` (an interrupted save)."""
        conn = self.conn()
        with conn:
            n = conn.execute("DELETE FROM images WHERE gen_added > ?", (gen,)).rowcount
            n += conn.execute("UPDATE images SET gen_removed = NULL WHERE gen_removed > ?", (gen,)).rowcount
        return n

    def purge(self, upto: int) -> int:
        """Physically delete rows removed at or before generation ``upto``."""
        conn = self.conn()
        with conn:
            return conn.execute("DELETE FROM images WHERE gen_removed <= ?", (upto,)).rowcount

    def segments_in_use(self) -> set[int]:
        return {int(r[0]) for r in self.conn().execute("SELECT DISTINCT seg FROM images")}

    def segment_live_counts(self) -> dict[int, int]:
        sql = "SELECT seg, COUNT(*) FROM images WHERE gen_removed IS NULL GROUP BY seg"
        return {int(a): int(b) for a, b in self.conn().execute(sql)}

    def set_failures(self, root: str, failures: Sequence[tuple[str, int, int, str, str]]) -> None:
        conn = self.conn()
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO failures VALUES (?,?,?,?,?,?)", [(root, *f) for f in failures]
            )

    def clear_failures(self, root: str, relpaths: Iterable[str]) -> None:
        conn = self.conn()
        with conn:
            conn.executemany(
                "DELETE FROM failures WHERE root = ? AND relpath = ?", [(root, r) for r in relpaths]
            )

    def failures(self, root: str) -> dict[str, tuple[int, int, str, str]]:
        sql = "SELECT relpath, size, mtime_ns, reason, message FROM failures WHERE root = ?"
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in self.conn().execute(sql, (root,))}

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
