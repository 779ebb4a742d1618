"""Walking, change planning and the reading stage (error records instead of exceptions)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from index.reader import ImageFileDataset, collate, content_hash, make_loader
from index.walk import FileEntry, Plan, WorkItem, plan_root, resolve_roots, walk


class ToTensor:
    """Minimal picklable transform: fixed-size float tensor."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def test_walk_filters_extensions_and_sorts(tmp_path):
    for name in ("b.JPG", "a.png", "c.txt", "sub/d.webp", "sub/e.heic.txt", "x.tiff", "y.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "folder.jpg" / "f.bmp").write_bytes(b"x")
    roots = resolve_roots([tmp_path])
    found = [e.relpath for e in walk(roots)]
    assert found == [
        "a.png",
        "b.JPG",
        "x.tiff",
        "y.gif",
        "folder.jpg/f.bmp",
        "sub/d.webp",
    ]  # files, then folders


def test_resolve_roots_drops_nested_and_rejects_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert resolve_roots([tmp_path / "a" / "b", tmp_path / "a"]) == [str((tmp_path / "a").resolve())]
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        resolve_roots([tmp_path / "f.jpg"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_folder_and_file_are_reported(tmp_path, encoder):
    (tmp_path / "locked").mkdir()
    make_image(tmp_path / "locked" / "a.png", 0)
    make_image(tmp_path / "secret.png", 1)
    os.chmod(tmp_path / "locked", 0)
    os.chmod(tmp_path / "secret.png", 0)
    try:
        errors = []
        entries = list(walk(resolve_roots([tmp_path]), lambda *e: errors.append(e)))
        assert errors and errors[0][1] == "unreadable"
        rec = ImageFileDataset([WorkItem(str(tmp_path), "secret.png")], ToTensor())[0]
        assert rec["status"] == "error" and rec["reason"] == "unreadable" and len(entries) == 1
    finally:
        os.chmod(tmp_path / "locked", 0o755)
        os.chmod(tmp_path / "secret.png", 0o644)


def test_plan_root_classifies_files():
    entries = [FileEntry("/r", n, s, m) for n, s, m in
               [("same.jpg", 10, 1), ("touched.jpg", 10, 2), ("grown.jpg", 11, 1), ("new.jpg", 5, 1),
                ("bad.jpg", 3, 1), ("bad_changed.jpg", 4, 2), ("unreadable.jpg", 7, 1)]]  # fmt: skip
    existing = {"same.jpg": (1, 10, 1, "h1"), "touched.jpg": (2, 10, 1, "h2"), "grown.jpg": (3, 10, 1, "h3"),
                "gone.jpg": (4, 9, 9, "h4")}  # fmt: skip
    failures = {"bad.jpg": (3, 1, "truncated", "m"), "bad_changed.jpg": (4, 1, "empty", "m"),
                "unreadable.jpg": (7, 1, "unreadable", "m")}  # fmt: skip
    plan = Plan()
    plan_root(entries, existing, failures, plan)
    work = {w.relpath: (w.old_id, w.expect_hash) for w in plan.work}
    assert work == {"touched.jpg": (2, "h2"), "grown.jpg": (3, None), "new.jpg": (None, None),
                    "bad_changed.jpg": (None, None), "unreadable.jpg": (None, None)}  # fmt: skip
    assert plan.unchanged == 1 and plan.deleted == [4] and plan.scanned == 7
    assert plan.known_bad == [("/r/bad.jpg", "truncated", "m")]


def test_reader_records(tmp_path):
    good = make_image(tmp_path / "good.png", 3)
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "empty.jpg").write_bytes(b"")
    items = [WorkItem(str(tmp_path), n) for n in ("good.png", "anim.gif", "empty.jpg", "vanished.jpg")]
    items.append(WorkItem(str(tmp_path), "good.png", old_id=7, expect_hash=content_hash(good.read_bytes())))
    ds = ImageFileDataset(items, ToTensor())
    recs = [ds[i] for i in range(len(items))]
    assert [r["status"] for r in recs] == ["ok", "ok", "error", "error", "same"]
    assert recs[0]["hash"] == content_hash(good.read_bytes()) and recs[0]["size"] == good.stat().st_size
    assert (recs[1]["width"], recs[1]["height"]) == (20, 10)
    assert torch.allclose(recs[1]["pixels"][0], torch.ones(8, 8), atol=0.02)  # the first (red) frame
    assert recs[2]["reason"] == "empty" and str(tmp_path / "empty.jpg") in recs[2]["message"]
    assert recs[3]["reason"] == "vanished"
    assert recs[4]["pixels"] is None  # unchanged content: not decoded

    pixels, batch = collate([ds[2], ds[0], ds[1]])
    assert pixels.shape == (2, 3, 8, 8) and [r["i"] for r in batch] == [2, 0, 1]
    assert collate([ds[2]])[0] is None
    loaded = list(make_loader(ds, batch_size=2, workers=2))
    assert [r["i"] for _, recs_ in loaded for r in recs_] == list(range(5))  # order kept across workers
