"""Export -> clip-retrieval folder (embedding-reader reads it) -> import: issue 15, acceptance 4."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, TEST_MAX_PIXELS, make_images

from index import Index
from index.builder import build_index
from index.interchange import import_embeddings

N = 240


@pytest.fixture(scope="module")
def exported(tmp_path_factory, encoder):
    tmp = tmp_path_factory.mktemp("roundtrip")
    make_images(tmp / "imgs", N)
    build_index([tmp / "imgs"], tmp / "idx", encoder, max_pixels=TEST_MAX_PIXELS, progress=False, workers=0)
    cmd = [sys.executable, str(ROOT / "scripts" / "export_embeddings.py"), "--index", str(tmp / "idx")]
    out = subprocess.run(
        [*cmd, "--out", str(tmp / "clip"), "--part-size", "100"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["parts"] == 3
    return tmp


def test_export_layout_is_aligned_npy_and_parquet(exported, encoder):
    clip = exported / "clip"
    total = 0
    for k in range(3):
        emb = np.load(clip / "img_emb" / f"img_emb_{k:05d}.npy")
        meta = pq.read_table(clip / "metadata" / f"metadata_{k:05d}.parquet")
        assert emb.dtype == np.float16 and emb.shape == (meta.num_rows, encoder.embed_dim)
        total += meta.num_rows
    assert total == N
    with Index.open(exported / "idx") as index:
        meta = pq.read_table(clip / "metadata" / "metadata_00001.parquet").to_pylist()
        emb = np.load(clip / "img_emb" / "img_emb_00001.npy").astype(np.float32)
        assert np.array_equal(index.get_vectors([m["id"] for m in meta]), emb)
        assert [r["path"] for r in index.get([m["id"] for m in meta])] == [m["image_path"] for m in meta]


def test_embedding_reader_reads_the_export(exported):
    try:
        from embedding_reader import EmbeddingReader
    except ImportError:
        pytest.skip("embedding-reader is not installed (it pins pandas<3); the layout test covers the format")
    clip = exported / "clip"
    reader = EmbeddingReader(
        embeddings_folder=str(clip / "img_emb"),
        metadata_folder=str(clip / "metadata"),
        meta_columns=["image_path"],
        file_format="parquet_npy",
    )
    assert reader.count == N
    paths, vectors = [], []
    for emb, meta in reader(batch_size=64, start=0, end=reader.count, parallel_pieces=1, max_piece_size=64):
        paths += list(meta["image_path"])
        vectors.append(emb)
    assert len(set(paths)) == N
    with Index.open(exported / "idx") as index:
        ids = {r["path"]: r["id"] for r in index.get(index.ids())}
        assert np.array_equal(
            index.get_vectors([ids[p] for p in paths]), np.concatenate(vectors).astype(np.float32)
        )


def test_import_gives_the_same_search_results(exported, encoder):
    cmd = [sys.executable, str(ROOT / "scripts" / "import_embeddings.py"), str(exported / "clip")]
    args = ["--index", str(exported / "imported"), "--model", encoder.name, "--mode", encoder.mode]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["added"] == summary["indexed"] == N and summary["parts"] == 3
    queries = np.random.default_rng(3).standard_normal((20, encoder.embed_dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with Index.open(exported / "idx") as a, Index.open(exported / "imported", model=encoder.name) as b:
        _, sa, ra = a.search(queries, 10)
        _, sb, rb = b.search(queries, 10)
        assert [[r["path"] for r in q] for q in ra] == [[r["path"] for r in q] for q in rb]
        np.testing.assert_array_equal(sa, sb)
        assert [r["hash"] for r in ra[0]] == [r["hash"] for r in rb[0]]
    again = import_embeddings(exported / "clip", exported / "imported", model=encoder.name)
    assert again.added == 0 and again.already == N and again.indexed == N


def test_import_skips_a_part_without_metadata(exported, tmp_path, encoder):
    clip = tmp_path / "clip"
    (clip / "img_emb").mkdir(parents=True)
    (clip / "metadata").mkdir()
    np.save(clip / "img_emb" / "img_emb_0.npy", np.ones((3, encoder.embed_dim), np.float16))
    report = import_embeddings(clip, tmp_path / "idx")
    assert report.skipped_parts == 1 and report.added == 0
    with pytest.raises(FileNotFoundError):
        import_embeddings(tmp_path, tmp_path / "idx2")
