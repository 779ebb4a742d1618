"""Atomic saves: a crash at every write step of a save leaves exactly the old or the new index."""

from __future__ import annotations

import os

import numpy as np
import pytest

from index import Index
from index import index as index_module

DIM = 8


class Crash(Exception):
    pass


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(start: int, n: int) -> list[dict]:
    return [{"path": f"/r/{i}.png"} for i in range(start, start + n)]


def state(folder) -> dict[int, str]:
    """Committed content as seen by a fresh reader, checked for internal consistency."""
    idx = Index.open(folder)
    ids = idx.ids()
    assert len(idx) == len(ids)
    got = {r["id"]: r["path"] for r in idx.get(ids.tolist())}
    if len(ids):
        vectors = idx.get_vectors(ids)
        top = idx.search(vectors, 1)[0][:, 0]
        assert top.tolist() == ids.tolist()  # FAISS ids and SQLite rows agree
        assert idx._faiss.ntotal == len(ids)
    idx.close()
    return got


def prepare(folder):
    idx = Index.create(folder, DIM, model="m")
    idx.add(unit(100, 0), rows(0, 100))
    idx.save()
    idx.add(unit(100, 1), rows(100, 100))
    idx.save()
    return idx


def pending_changes(idx):
    idx.add(unit(4200, 2), rows(200, 4200))  # large enough to force a FAISS rewrite and a segment merge
    idx.remove(list(range(0, 200, 7)))


N_REPLACES = 4  # new segment, merged segment, FAISS file, manifest


@pytest.mark.parametrize("crash_at", range(1, N_REPLACES + 2))
def test_crash_during_save_leaves_old_or_new(tmp_path, monkeypatch, crash_at):
    folder = tmp_path / "ix"
    idx = prepare(folder)
    before = state(folder)
    pending_changes(idx)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise Crash(f"crash before rename #{crash_at}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    if crash_at == N_REPLACES + 1:  # crash after the manifest rename, during clean-up
        monkeypatch.setattr(index_module.Index, "_cleanup", lambda self, *a: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        idx.save()
    idx.close()  # the process is gone: only its lock is released
    monkeypatch.undo()
    assert [os.path.basename(c) for c in calls[-1:]] != [] and len(calls) == min(crash_at, N_REPLACES)
    after = state(folder)
    expected_new = {i: f"/r/{i}.png" for i in range(4400) if not (i < 200 and i % 7 == 0)}
    if crash_at <= N_REPLACES:
        assert after == before
    else:
        assert after == expected_new
    # a new writer rolls back / cleans up and carries on normally
    w = Index.open(folder)
    w.add(unit(3, 9), rows(5000, 3))
    w.save()
    w.close()
    final = state(folder)
    assert len(final) == len(after) + 3
    leftovers = [p.name for p in folder.rglob(".*.tmp")]
    assert leftovers == []


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_failed_save_keeps_the_object_usable(tmp_path, monkeypatch, crash_at):
    folder = tmp_path / "ix"
    idx = prepare(folder)
    before = state(folder)
    pending_changes(idx)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="No space"):
        idx.save()
    monkeypatch.undo()
    assert len(idx) == len(before)  # back to the committed state, unsaved changes dropped
    idx.add(unit(3, 9), rows(5000, 3))
    idx.remove([1])
    idx.save()
    expected = {p for i, p in before.items() if i != 1} | {f"/r/{i}.png" for i in range(5000, 5003)}
    after = state(folder)
    assert set(after.values()) == expected and len(after) == len(expected)
