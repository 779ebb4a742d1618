"""Ray engine == local engine on a few thousand generated images (issue 15, acceptance 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the Ray engine needs the [distributed] extra")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from conftest import ROOT, TEST_MAX_PIXELS, TINY_MODEL, make_bad_files, make_images  # noqa: E402

from index import Index  # noqa: E402
from index.builder import build_index  # noqa: E402
from index.ray_engine import build_index_ray, shard_folder  # noqa: E402
from index.shards import ShardDir  # noqa: E402

N_IMAGES = 2000
SPEC = {"model": str(TINY_MODEL), "mode": None, "device": "cpu", "dtype": None}


def by_path(index: Index) -> dict[str, int]:
    ids = index.ids()
    return {row["path"]: int(i) for i, row in zip(ids, index.get(ids), strict=True)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder, ray_session):
    """The same folder (2000 images + 10 bad files) built by both engines, batch size 1, one thread."""
    tmp = tmp_path_factory.mktemp("raybuild")
    make_images(tmp / "imgs", N_IMAGES)
    bad = make_bad_files(tmp / "imgs" / "bad")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray actor: float32 results then agree bit for bit
    try:
        local = build_index(
            [tmp / "imgs"], tmp / "local", encoder, batch_size=1, workers=1, max_pixels=TEST_MAX_PIXELS,
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    ray_report = build_index_ray(
        [tmp / "imgs"], tmp / "ray", encoder, SPEC, shard_size=400, batch_size=1,
        max_pixels=TEST_MAX_PIXELS, progress=False, seed=0,
    )  # fmt: skip
    return tmp, local, ray_report, bad


def test_ray_index_equals_local_index(built):
    tmp, local, ray_report, _ = built
    with Index.open(tmp / "local") as a, Index.open(tmp / "ray") as b:
        pa_, pb = by_path(a), by_path(b)
        assert set(pa_) == set(pb) and len(pa_) == N_IMAGES
        paths = sorted(pa_)
        va = a.get_vectors([pa_[p] for p in paths])
        vb = b.get_vectors([pb[p] for p in paths])
        assert np.abs(va - vb).max() <= 1e-6
        queries = np.random.default_rng(1).standard_normal((20, a.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        _, _, rows_a = a.search(queries, 10)
        _, _, rows_b = b.search(queries, 10)
        assert [[r["path"] for r in q] for q in rows_a] == [[r["path"] for r in q] for q in rows_b]
        assert [r["hash"] for r in a.get([pa_[p] for p in paths])] == [
            r["hash"] for r in b.get([pb[p] for p in paths])
        ]
    same = {k: v for k, v in local.summary().items() if k not in ("seconds", "images_per_s")}
    assert same == {k: v for k, v in ray_report.summary().items() if k not in ("seconds", "images_per_s")}


def test_bad_files_skipped_with_the_same_reasons(built):
    tmp, local, ray_report, bad = built
    reasons = {Path(p).name: r for p, r, _ in ray_report.skipped_files}
    assert reasons == bad
    assert sorted(local.skipped_files) == sorted(ray_report.skipped_files)
    assert (tmp / "local" / "skipped.tsv").read_text() == (tmp / "ray" / "skipped.tsv").read_text()


def test_shards_in_clip_retrieval_layout(built, encoder):
    tmp, *_ = built
    work = ShardDir(shard_folder(tmp / "ray"))
    shards = sorted(work.complete())
    assert len(shards) == 6 and work.merged() == set(shards)  # 2010 files / 400 per shard
    total = 0
    for s in shards:
        emb = np.load(work.emb_path(s))
        meta = pq.read_table(work.metadata_path(s))
        assert emb.dtype == np.float16 and emb.shape == (meta.num_rows, encoder.embed_dim)
        assert "image_path" in meta.column_names
        total += meta.num_rows
    assert total == N_IMAGES
    # shuffled: a shard is not a contiguous run of the sorted paths
    first = pq.read_table(work.manifest_path(shards[0])).column("path").to_pylist()
    assert first != sorted(first)
    assert not list(work.dir.rglob("*.tmp"))


def test_rerun_has_nothing_to_do(built, encoder):
    tmp, *_ = built
    report = build_index_ray(
        [tmp / "imgs"], tmp / "ray", encoder, SPEC, progress=False, max_pixels=TEST_MAX_PIXELS
    )
    assert report.encoded == 0 and report.unchanged == N_IMAGES and report.indexed == N_IMAGES
    assert len(ShardDir(shard_folder(tmp / "ray")).complete()) == 6


def test_from_list_builds_the_listed_files(built, encoder, tmp_path):
    tmp, *_ = built
    files = sorted(p for p in (tmp / "imgs").rglob("*.png") if "bad" not in p.parts)[:50]
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": [str(p) for p in files] + [str(tmp_path / "gone.jpg")]}), listing)
    report = build_index_ray(
        [], tmp_path / "idx", encoder, SPEC, from_list=listing, progress=False, max_pixels=TEST_MAX_PIXELS
    )
    assert report.added == 50 and [(Path(p).name, r) for p, r, _ in report.skipped_files] == [
        ("gone.jpg", "unreadable")
    ]
    with Index.open(tmp_path / "idx") as index:
        assert set(by_path(index)) == {str(p) for p in files}


def test_cli_engine_flags(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "scripts" / "build_index.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    out = run(str(tmp_path), "--index", str(tmp_path / "i"), "--model", "demo", "--encoders", "2")
    assert out.returncode == 2 and "--engine ray" in out.stderr
    out = run("--index", str(tmp_path / "i"), "--model", "demo", "--engine", "ray")
    assert out.returncode == 2 and "--from-list" in out.stderr
    out = run(
        str(tmp_path),
        "--index",
        str(tmp_path / "i"),
        "--model",
        "demo",
        "--engine",
        "ray",
        "--shard-size",
        "0",
    )
    assert out.returncode == 2


def test_cli_ray_engine_prints_the_summary(tmp_path, ray_session):
    make_images(tmp_path / "imgs", 30)
    address = ray_session.get_runtime_context().gcs_address
    cmd = [
        sys.executable, str(ROOT / "scripts" / "build_index.py"), str(tmp_path / "imgs"), "--index",
        str(tmp_path / "idx"), "--model", str(TINY_MODEL), "--device", "cpu", "--engine", "ray",
        "--ray-address", address, "--shard-size", "10", "--no-progress",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["added"] == 30 and summary["indexed"] == 30 and summary["skipped"] == 0
    assert (tmp_path / "idx" / "skipped.tsv").exists()


def test_stale_shard_of_an_earlier_run_never_replaces_newer_rows(tmp_path, encoder):
    from index.builder import BuildReport, open_or_create
    from index.ray_engine import ShardMerger
    from index.reader import content_hash

    (image,) = make_images(tmp_path / "imgs", 1)
    st = image.stat()
    row = {"root": str(image.parent), "relpath": image.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    meta = [
        {**row, "image_path": str(image), "hash": content_hash(image.read_bytes()), "width": 8, "height": 8}
    ]
    work = ShardDir(tmp_path / "shards").ensure()
    work.write_shard(0, np.ones((1, encoder.embed_dim), np.float32) / encoder.embed_dim**0.5, meta, [])
    work.write_shard(1, np.ones((1, encoder.embed_dim), np.float32) / encoder.embed_dim**0.5, meta, [])
    image.write_bytes(image.read_bytes() + b"\0")  # the file changed after shard 1 was written
    index = open_or_create(tmp_path / "idx", encoder)
    try:
        merger = ShardMerger(index, work)
        merger.merge(1, BuildReport(), verify=True)
        assert len(index) == 0 and work.merged() == {1}
        merger.merge(0, report := BuildReport())  # this run's shard: taken as is, and only once
        merger.merge(0, BuildReport())
        assert len(index) == 1 and report.added == 1
    finally:
        index.close()


def test_embedding_reader_reads_the_ray_shards(built):
    try:
        from embedding_reader import EmbeddingReader
    except ImportError:
        pytest.skip("embedding-reader is not installed (it pins pandas<3); the layout test covers the format")
    work = ShardDir(shard_folder(built[0] / "ray"))
    reader = EmbeddingReader(
        embeddings_folder=str(work.dir / "img_emb"),
        metadata_folder=str(work.dir / "metadata"),
        meta_columns=["image_path"],
        file_format="parquet_npy",
    )
    paths = []
    for _, meta in reader(batch_size=500, start=0, end=reader.count, parallel_pieces=1, max_piece_size=500):
        paths += list(meta["image_path"])
    assert reader.count == len(set(paths)) == N_IMAGES


def test_ivf_is_trained_once_after_all_shards(tmp_path, encoder, ray_session, monkeypatch):
    from index import maintenance

    calls = []
    real = maintenance.rebuild_faiss

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003
        calls.append(args[3])  # the factory string
        return real(*args, **kwargs)

    monkeypatch.setattr(maintenance, "rebuild_faiss", counting)
    make_images(tmp_path / "imgs", 640)
    report = build_index_ray(
        [tmp_path / "imgs"], tmp_path / "idx", encoder, SPEC, shard_size=80, index_type="ivf-flat",
        progress=False, max_pixels=TEST_MAX_PIXELS,
    )  # fmt: skip
    assert report.added == 640
    assert calls == ["IVF16,Flat"]  # 8 shards merged, one training at the end (not IVF8, then IVF16)
    with Index.open(tmp_path / "idx") as index:
        assert index.manifest["faiss_factory"] == "IVF16,Flat" and len(index) == 640
