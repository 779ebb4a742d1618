"""Keyword and hybrid search on a real index: file names, paths and captions (FTS5 trigram + LIKE for
1-2 character words), Chinese and Japanese, schema-2 migration."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from index import Index, hybrid
from index.store import SCHEMA_VERSION, MetaStore

DIM = 8


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def index_dir(tmp_path):
    rng = np.random.default_rng(0)
    vecs = _unit(rng.standard_normal((60, DIM)))
    rows = [
        {"root": "/photos", "relpath": f"2024/img_{i:03d}.jpg", "width": 64, "height": 48} for i in range(60)
    ]
    rows[41]["relpath"] = "scans/IMG_2024_invoice.png"
    idx = Index.create(tmp_path / "ix", DIM)
    ids = idx.add(vecs, rows)
    captions = {7: "a whiteboard covered in notes", 8: "会議室の白板", 9: "赤い自転車"}
    captions[10] = "一只橘色的猫在沙发上"
    assert idx.set_captions({int(ids[i]): c for i, c in captions.items()}) == 4
    idx.save()
    idx.close()
    return tmp_path / "ix"


@pytest.mark.parametrize(
    ("query", "expected"),
    [("invoice", 41), ("IMG_2024", 41), ("WHITEBOARD", 7), ("白板", 8), ("会議室", 8), ("赤", 9),
     ("自転車", 9), ("猫", 10), ("橘色的猫", 10)],
)  # fmt: skip
def test_keyword_finds_names_and_captions_in_any_script(index_dir, query, expected):
    with Index.open(index_dir) as idx:
        rows = idx.keyword_search(query, 5)
        assert rows and rows[0]["id"] == expected, rows[:2]
        assert [r["id"] for r in rows].count(expected) == 1


def test_short_words_are_literal_substrings(index_dir):
    with Index.open(index_dir) as idx:
        assert idx.keyword_search("%", 5) == []  # LIKE wildcards are escaped
        ids = [r["id"] for r in idx.keyword_search("_0", 100)]
        assert len(ids) == 59 and 41 not in ids  # "_" is not "any character": IMG_2024 has "20", not "_0"


def test_found_only_by_keyword_not_by_vector(index_dir):
    with Index.open(index_dir) as idx:
        far = -idx.get_vectors([41])[0]  # the query vector points away from the invoice scan
        vector = hybrid.search(idx, k=10, mode="vector", vector=far)
        assert 41 not in [r["id"] for r in vector]
        assert all(r["found_by"] == ["vector"] for r in vector)
        for mode in ("keyword", "hybrid"):
            rows = hybrid.search(idx, k=10, mode=mode, vector=far, text="invoice")
            found = {r["id"]: r for r in rows}
            assert 41 in found and "keyword" in found[41]["found_by"], mode
        rows = hybrid.search(idx, k=60, mode="hybrid", vector=far, text="whiteboard", alpha=0.5)
        assert rows[0]["found_by"] in (["vector", "keyword"], ["keyword"])
        assert hybrid.search(idx, k=5, mode="hybrid", vector=far, text="whiteboard", alpha=1.0)[0]["id"] != 7
        assert hybrid.search(idx, k=5, mode="hybrid", vector=far, text="whiteboard", alpha=0.0)[0]["id"] == 7
        assert (
            idx.get([7])[0]["caption"] == "a whiteboard covered in notes"
            and idx.get([0])[0]["caption"] is None
        )


def test_keyword_respects_filters_offset_and_min_score(index_dir):
    with Index.open(index_dir) as idx:
        assert hybrid.search(idx, k=5, mode="keyword", text="invoice", filters={"path_prefix": "2024/"}) == []
        all_rows = hybrid.search(idx, k=60, mode="keyword", text="img_0")
        assert len(all_rows) == 59  # every 2024/img_0xx.jpg
        page = hybrid.search(idx, k=10, mode="keyword", text="img_0", offset=10)
        assert [r["id"] for r in page] == [r["id"] for r in all_rows[10:20]]
        cut = all_rows[5]["score"]
        assert all(
            r["score"] >= cut for r in hybrid.search(idx, k=60, mode="keyword", text="img_0", min_score=cut)
        )
        assert hybrid.search(idx, k=5, mode="keyword", text="   ") == []


def test_fuse_is_weighted_reciprocal_rank_fusion():
    fused = hybrid.fuse({"vector": [1, 2, 3], "keyword": [3, 4]}, {"vector": 0.5, "keyword": 0.5}, rrf_k=60)
    scores = {rid: s for rid, s, _ in fused}
    assert fused[0][0] == 3 and fused[0][2] == ["vector", "keyword"]
    assert scores[3] == pytest.approx(0.5 / 63 + 0.5 / 61)
    assert scores[4] == pytest.approx(0.5 / 62) and scores[2] == pytest.approx(0.5 / 62)
    assert [rid for rid, _, _ in fused][1:4] == [1, 2, 4]  # 2 and 4 tie: by id


def _downgrade_to_schema_2(db):
    conn = sqlite3.connect(db)
    with conn:
        for trigger in ("images_fts_insert", "images_fts_delete", "images_fts_update"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE images_fts")
        conn.execute("ALTER TABLE images DROP COLUMN caption")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()


def test_schema_2_index_is_readable_and_migrated_by_the_writer(index_dir):
    _downgrade_to_schema_2(index_dir / "meta.sqlite")
    with Index.open(index_dir) as idx:  # a reader: no migration, no captions, LIKE over paths
        assert idx.get([7])[0]["caption"] is None
        assert idx.keyword_search("invoice", 3)[0]["id"] == 41
        assert idx.keyword_search("whiteboard", 3) == []
    with Index.open(index_dir) as idx:
        idx.lock_for_writing()
        assert idx.store.schema_version() == SCHEMA_VERSION == 3
        assert idx.keyword_search("invoice", 3)[0]["id"] == 41  # existing rows are in the FTS table
        idx.set_captions({3: "a whiteboard"})
        assert idx.keyword_search("whiteboard", 3)[0]["id"] == 3
        idx.remove([3])
        idx.save()
        assert idx.keyword_search("whiteboard", 3) == []
    store = MetaStore(index_dir / "meta.sqlite")
    assert store.migrate() is False
    store.close()
