"""Keyword search over file names, relative paths and captions (SQLite FTS5, ``tokenize='trigram'``).

The query is split on whitespace into words (at most :data:`MAX_TERMS`); a row matches when it contains any
word, case-insensitively. Words of 3+ characters go through ``images_fts`` (ranked by BM25, a file-name
match weighing most); the trigram tokenizer matches no word shorter than 3 characters, so 1-2 character
words (Chinese / Japanese words such as "白板" or "赤") are matched with ``LIKE`` over the same columns.
A row's score is ``-bm25`` of its FTS match plus :data:`SHORT_TERM_SCORE` per short word it contains,
and ties break by id. Databases not migrated to schema 3 (no FTS table, no captions) use ``LIKE`` for all
words over the relative path.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: words of a query beyond this many are ignored
MAX_TERMS = 16
#: FTS5 ``bm25`` column weights: name, relpath, caption
BM25_WEIGHTS = (4.0, 1.0, 2.0)
#: score added for each 1-2 character word a row contains (BM25 of a single FTS word is of this order)
SHORT_TERM_SCORE = 1.0
#: the trigram tokenizer's shortest matchable word
TRIGRAM = 3

_VISIBLE = "i.gen_added <= ? AND (i.gen_removed IS NULL OR i.gen_removed > ?)"


def terms(text: str) -> list[str]:
    """The distinct words of ``text``, in order, at most :data:`MAX_TERMS`."""
    out: list[str] = []
    for word in text.split():
        if word not in out:
            out.append(word)
    if len(out) > MAX_TERMS:
        logger.debug("keyword query has %d words, using the first %d", len(out), MAX_TERMS)
    return out[:MAX_TERMS]


def _fts_phrase(word: str) -> str:
    return '"' + word.replace('"', '""') + '"'


def _like(word: str) -> str:
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search(
    store: Any, text: str, gen: int, k: int, where: str = "1", params: list[Any] | tuple = ()
) -> list[tuple[int, float]]:
    """``(id, score)`` of the top-``k`` rows visible at ``gen`` matching ``text`` and the SQL condition
    ``where`` (on columns of ``images``, e.g. from :func:`index.filters.where_sql`), best first."""
    words = terms(text)
    if not words or k < 1:
        return []
    fts = store.has_captions()
    long_words = [w for w in words if len(w) >= TRIGRAM] if fts else []
    short_words = [w for w in words if w not in long_words]
    columns = ("i.relpath", "i.caption") if fts else ("i.relpath",)
    score_parts: list[str] = []
    match_parts: list[str] = []
    sql_params: list[Any] = []
    joins = ""
    if long_words:
        weights = ", ".join(str(w) for w in BM25_WEIGHTS)
        joins = (
            f" LEFT JOIN (SELECT rowid AS fid, -bm25(images_fts, {weights}) AS s FROM images_fts"
            " WHERE images_fts MATCH ?) f ON f.fid = i.id"
        )
        sql_params.append(" OR ".join(_fts_phrase(w) for w in long_words))
        score_parts.append("coalesce(f.s, 0.0)")
        match_parts.append("f.fid IS NOT NULL")
    like_params: list[Any] = []
    for word in short_words:
        cond = "(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in columns) + ")"
        score_parts.append(f"({cond} * {SHORT_TERM_SCORE})")
        match_parts.append(cond)
        like_params += [_like(word)] * len(columns)
    if long_words and not short_words:  # driven by the FTS index: no scan of ``images``
        joins = joins.replace(" LEFT JOIN ", " JOIN ")
    # placeholders in text order: the LIKEs of the score, the MATCH, visibility, the LIKEs of the match
    # condition, the filter, the limit
    sql = (
        f"SELECT i.id, {' + '.join(score_parts)} AS score FROM images i{joins}"
        f" WHERE {_VISIBLE} AND ({' OR '.join(match_parts)}) AND ({where})"
        " ORDER BY score DESC, i.id LIMIT ?"
    )
    args = [*like_params, *sql_params, gen, gen, *like_params, *params, int(k)]
    return [(int(rid), float(score)) for rid, score in store.conn().execute(sql, args)]
