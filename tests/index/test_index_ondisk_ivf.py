"""On-disk IVF (issue 15): trained once on a sample, blocks added separately, ``merge_ondisk``'ed."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TEST_MAX_PIXELS, TINY_MODEL, make_images

from index import Index, ondisk

DIM = 32
N = 3000


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"path": f"/data/img{i:05d}.jpg", "size": i, "mtime_ns": i} for i in range(start, start + n)]


QUERIES = vectors(20, seed=99)


def build(folder, index_type: str, on_disk: bool, monkeypatch) -> Index:  # noqa: ANN001
    """``N`` vectors in three saves (three segments), then the final save in memory or on disk."""
    monkeypatch.setattr(ondisk, "BLOCK_ROWS", 700)  # several blocks, not aligned with the segments
    index = Index.create(folder, DIM, index_type=index_type)
    x = vectors(N, seed=0)
    for start in range(0, N, 1000):
        index.add(x[start : start + 1000], rows(1000, start))
        index.save(keep_structure=True)
    if on_disk:
        assert index.save_ondisk()
    else:
        index.save(full=True)
    return index


def sha(path) -> str:  # noqa: ANN001
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("index_type", ["ivf-flat", "ivf-pq"])
def test_ondisk_ivf_searches_as_the_in_memory_ivf(tmp_path, monkeypatch, index_type):
    mem = build(tmp_path / "mem", index_type, False, monkeypatch)
    disk = build(tmp_path / "disk", index_type, True, monkeypatch)
    assert mem.manifest["faiss_factory"] == disk.manifest["faiss_factory"]
    assert disk.manifest["faiss_factory"].startswith("IVF")
    assert ondisk.is_ondisk(disk._faiss) and not ondisk.is_ondisk(mem._faiss)
    ivfdata = tmp_path / "disk" / ondisk.companion(disk.manifest["faiss_file"])
    assert ivfdata.exists() and not list(tmp_path.glob("disk/.ivf-blocks-*"))
    ids_m, d_m, _ = mem.search(QUERIES, 10)
    ids_d, d_d, _ = disk.search(QUERIES, 10)
    np.testing.assert_array_equal(ids_m, ids_d)
    np.testing.assert_allclose(d_m, d_d, atol=1e-5, rtol=0)
    assert (ids_d >= 0).all()
    # ids are our row ids: each hit's stored vector gives its distance
    np.testing.assert_allclose(
        np.einsum("d,kd->k", QUERIES[0], disk.get_vectors(ids_d[0])), d_d[0], atol=1e-5, rtol=0
    )
    mem.close()
    disk.close()


def test_ondisk_ivf_reopens_and_takes_incremental_changes(tmp_path, monkeypatch):
    folder = tmp_path / "disk"
    build(folder, "ivf-flat", True, monkeypatch).close()
    mem = build(tmp_path / "mem", "ivf-flat", False, monkeypatch)
    expect_ids, expect_d, _ = mem.search(QUERIES, 10)
    # a restart in a fresh process: the on-disk lists are found next to the .faiss file, memory-mapped
    code = (
        "import sys, numpy as np; from index import Index, ondisk; ix = Index.open(sys.argv[1]); "
        "assert ondisk.is_ondisk(ix._faiss); np.save(sys.argv[2], ix.search(np.load(sys.argv[3]), 10)[0])"
    )
    np.save(tmp_path / "q.npy", QUERIES)
    subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "ids.npy"), str(tmp_path / "q.npy")],
        check=True,
        cwd=ROOT,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), expect_ids)

    reader = Index.open(folder)
    assert ondisk.is_ondisk(reader._faiss)
    ivfdata = folder / ondisk.companion(reader.manifest["faiss_file"])
    before = sha(ivfdata)
    ids_r, d_r, _ = reader.search(QUERIES, 10)
    np.testing.assert_array_equal(ids_r, expect_ids)
    np.testing.assert_allclose(d_r, expect_d, atol=1e-5, rtol=0)

    # incremental adds and removes after the on-disk save: a small delta (FAISS file not rewritten)
    extra = vectors(50, seed=7)
    for ix in (mem, Index.open(folder)):
        new = ix.add(extra, rows(50, N))
        ix.remove([int(expect_ids[0, 0])])
        ix.save()
        np.testing.assert_array_equal(ix.search(extra[:5], 1)[0][:, 0], new[:5])
        if ix is not mem:
            assert ix.manifest["faiss_file"] == reader.manifest["faiss_file"]  # still the on-disk file
            ix.close()
    assert sha(ivfdata) == before  # shared with readers: never written after its commit
    ids_r, _, _ = reader.search(QUERIES, 10)
    np.testing.assert_array_equal(ids_r, expect_ids)  # the reader keeps its generation
    reader.close()

    fresh = Index.open(folder)  # replays the delta over an in-memory copy of the lists
    assert len(fresh) == N + 49
    np.testing.assert_array_equal(fresh.search(QUERIES, 10)[0], mem.search(QUERIES, 10)[0])
    fresh.close()

    # a full save rewrites FAISS in memory; the old .ivfdata goes with its .faiss file
    writer = Index.open(folder)
    writer.save(full=True)
    assert not ondisk.is_ondisk(writer._faiss)
    np.testing.assert_array_equal(writer.search(QUERIES, 10)[0], mem.search(QUERIES, 10)[0])
    writer.save_ondisk()  # and back on disk, retrained on the current rows
    assert ondisk.is_ondisk(writer._faiss)
    writer.close()
    assert sorted(p.suffix for p in (folder / "faiss").iterdir()) == [".faiss", ".faiss", ".ivfdata"]
    with Index.open(folder) as again:
        assert ondisk.is_ondisk(again._faiss) and len(again) == N + 49
    mem.close()


def test_ondisk_save_is_a_no_op_when_up_to_date_and_plain_for_flat(tmp_path, monkeypatch):
    index = build(tmp_path / "disk", "ivf-flat", True, monkeypatch)
    name = index.manifest["faiss_file"]
    calls = []
    assert index.save_ondisk(map_blocks=lambda fn, args: calls.append(args) or [])
    assert calls == [] and index.manifest["faiss_file"] == name
    index.close()
    flat = Index.create(tmp_path / "flat", DIM, index_type="flat")
    flat.add(vectors(100, 1), rows(100))
    assert not flat.save_ondisk()  # not IVF: saved as usual
    assert flat.manifest["count"] == 100 and not ondisk.is_ondisk(flat._faiss)
    flat.close()


def test_ondisk_blocks_run_as_parallel_ray_tasks(tmp_path, monkeypatch, ray_session):
    from index.ray_engine import ray_map_blocks

    mem = build(tmp_path / "mem", "ivf-flat", False, monkeypatch)
    monkeypatch.setattr(ondisk, "BLOCK_ROWS", 1000)
    index = Index.create(tmp_path / "ray", DIM, index_type="ivf-flat")
    index.add(vectors(N, seed=0), rows(N))
    seen = []

    def mapper(fn, args):  # noqa: ANN001, ANN202
        seen.append(len(args))
        return ray_map_blocks(fn, args)

    assert index.save_ondisk(map_blocks=mapper)
    assert seen == [3] and ondisk.is_ondisk(index._faiss)
    np.testing.assert_array_equal(index.search(QUERIES, 10)[0], mem.search(QUERIES, 10)[0])
    index.close()
    mem.close()


def test_ray_build_with_ondisk_forced(tmp_path, encoder, ray_session):
    """``build_index_ray(ondisk=True)`` at small N: an on-disk IVF that searches as the in-memory rebuild of
    the same rows (same training sample), and a re-run with nothing new leaves it as it is."""
    import shutil

    from index.ray_engine import build_index_ray

    make_images(tmp_path / "imgs", 400)
    spec = {"model": str(TINY_MODEL), "mode": None, "device": "cpu", "dtype": None}
    kwargs = dict(shard_size=100, batch_size=8, max_pixels=TEST_MAX_PIXELS, progress=False, seed=0)
    report = build_index_ray(
        [tmp_path / "imgs"], tmp_path / "ray", encoder, spec, index_type="ivf-flat", ondisk=True, **kwargs
    )
    assert report.indexed == 400
    shutil.copytree(tmp_path / "ray", tmp_path / "copy")  # found next to its .faiss file, not the original
    with Index.open(tmp_path / "copy") as copy:
        assert ondisk.is_ondisk(copy._faiss) and copy.manifest["faiss_factory"].startswith("IVF")
        queries = copy.get_vectors(copy.ids()[:20])
        ids_d, d_d, _ = copy.search(queries, 10)
        copy.rebuild()  # in memory, trained on the same sample
        assert not ondisk.is_ondisk(copy._faiss)
        ids_m, d_m, _ = copy.search(queries, 10)
    np.testing.assert_array_equal(ids_d, ids_m)
    np.testing.assert_allclose(d_d, d_m, atol=1e-5, rtol=0)
    with Index.open(tmp_path / "ray") as index:
        name = index.manifest["faiss_file"]
    again = build_index_ray([tmp_path / "imgs"], tmp_path / "ray", encoder, spec, ondisk=True, **kwargs)
    assert again.added == 0
    with Index.open(tmp_path / "ray") as index:
        assert index.manifest["faiss_file"] == name and ondisk.is_ondisk(index._faiss)
