"""CLI side of issue 13: build_index.py --caption (resumable, summary counts), find_duplicates.py JSON,
bench_index.py --filters smoke run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_images

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Captioning:
    """The tiny encoder plus a deterministic ``caption`` with the InternVL encoders' signature."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self._inner = inner
        self.prompts: list[str] = []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._inner, name)

    def caption(self, images, prompt="English caption:", *, num_beams=5, min_new_tokens=8, max_new_tokens=30,
                **kwargs):  # noqa: ANN001,ANN201  # fmt: skip
        self.prompts += [prompt] * len(images)
        return [f"{prompt} picture {im.width}x{im.height}" for im in images]


def _run(module, argv: list[str], capsys) -> tuple[int, dict | None]:  # noqa: ANN001
    rc = module.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(lines[-1]) if lines else None


def test_build_index_caption_flags(tmp_path, encoder, monkeypatch, capsys):
    import retrieval

    photos = tmp_path / "photos"
    make_images(photos, 4)
    wrapped = _Captioning(encoder)
    monkeypatch.setattr(retrieval, "load_encoder", lambda *a, **k: wrapped)
    script = _script("build_index")
    base = [str(photos), "--index", str(tmp_path / "ix"), "--model", "x", "--workers", "0", "--no-progress"]
    rc, summary = _run(script, base, capsys)
    assert rc == 0 and (summary["captioned"], summary["with_caption"]) == (0, 0)
    rc, summary = _run(
        script, [*base, "--caption", "--caption-prompt", "Légende :", "--caption-batch-size", "3"], capsys
    )
    assert rc == 0 and (summary["captioned"], summary["with_caption"]) == (4, 4)
    assert wrapped.prompts == ["Légende :"] * 4
    rc, summary = _run(script, [*base, "--caption"], capsys)
    assert rc == 0 and (summary["captioned"], summary["with_caption"]) == (0, 4)  # resumable: nothing left

    monkeypatch.setattr(retrieval, "load_encoder", lambda *a, **k: encoder)  # no caption method
    if not hasattr(encoder, "caption"):
        assert script.main([*base, "--caption"]) == 3
        assert "cannot caption" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args([*base, "--caption-batch-size", "0"])


def test_find_duplicates_script(tmp_path, capsys):
    import numpy as np

    from index import Index

    vecs = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    vecs[5] = vecs[1] + 0.01
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with Index.create(tmp_path / "ix", 8) as idx:
        rows = [{"path": f"/p/{i}.jpg", "width": 10 + i, "height": 10} for i in range(6)]
        idx.add(vecs, rows)
        idx.save()
    script = _script("find_duplicates")
    assert script.main(["--index", str(tmp_path / "ix")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_groups"] == 1 and [r["id"] for r in out["groups"][0]] == [5, 1]  # larger first
    assert script.main(["--index", str(tmp_path / "missing")]) == 3


def test_bench_index_filters_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_index.py"), "--filters", "--rows", "3000",
           "--dim", "16", "--types", "flat,ivf-flat", "--queries", "5", "--clusters", "20",
           "--workdir", str(tmp_path)]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    for label in ("none", "1%", "10%", "50%", "vector", "keyword", "hybrid"):
        assert any(line.split()[:1] == [label] for line in out.splitlines()), (label, out)
    recalls = [float(line.split()[-1]) for line in out.splitlines() if line.split()[:1] in (["1%"], ["10%"])]
    assert recalls and min(recalls) >= 0.9, out


def test_caption_pass_captions_a_video_by_its_middle_frame(tmp_path, encoder):
    from test_index_video import FPS, make_clip

    from index import Index
    from index.builder import build_index

    folder = tmp_path / "lib"
    make_images(folder, 2)
    make_clip(folder / "clip.mp4", 2 * FPS, seed=3, size=(64, 48))
    wrapped = _Captioning(encoder)
    report = build_index([folder], tmp_path / "ix", wrapped, workers=0, progress=False, video_segments=1.0,
                         caption=True)  # fmt: skip
    assert report.captioned == report.with_caption == 3  # 2 images + 1 video; segments are not captioned
    with Index.open(tmp_path / "ix") as idx:
        rows = idx.get(idx.ids())
        by_kind = {r["kind"]: r["caption"] for r in rows if r["kind"] != "image"}
        assert by_kind == {"video": "English caption: picture 64x48", "segment": None}
