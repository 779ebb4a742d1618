"""scripts/demo.py --no-serve: generates the demo folder and builds its index with the bundled model."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import demo
import pytest

from retrieval.loader import DEMO_MODEL_DIR


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")
def test_demo_builds_the_index_without_serving(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert demo.main(["--out", str(tmp_path), "--n", "12", "--no-serve"]) == 0
    files = sorted(f.name for f in (tmp_path / "images").iterdir())
    clips = [demo.video_name(i) for i in range(len(demo.VIDEO_SCENES))]
    assert len(files) == 12 + len(clips) and set(clips) <= set(files)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest  # the index helper's manifest exists and is JSON
    out = capsys.readouterr().out
    assert "红色的圆形" in out and "/classify" in out and "python -m api --index" in out
    assert "000000.png" in out  # the classify example uses an image, not a video
    assert "open the web page: http://127.0.0.1:8000/" in out

    from index import Index
    from retrieval import load_encoder

    with Index.open(tmp_path / "index") as idx:
        rows = [r for r in idx.get(idx.ids().tolist()) if r is not None]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("image") == 12 and kinds.count("video") == len(clips)
    for i, scenes in enumerate(demo.VIDEO_SCENES):  # one 1-s segment per scene, with its times
        path = str(tmp_path / "images" / clips[i])
        segs = sorted(
            (r["t_start"], r["t_end"]) for r in rows if r["path"] == path and r["kind"] == "segment"
        )
        assert segs == [(float(s), float(s + 1)) for s in range(len(scenes))]

    # a colour + shape shown only in a video: the text search finds its moment
    with open(tmp_path / "captions.csv", encoding="utf-8") as f:
        in_images = {(row["shape"], row["colour"]) for row in csv.DictReader(f)}
    only_video = [
        (i, s, scene)
        for i, scenes in enumerate(demo.VIDEO_SCENES)
        for s, scene in enumerate(scenes)
        if scene not in in_images
    ]
    assert only_video
    encoder = load_encoder("demo", device="cpu")
    with Index.open(tmp_path / "index") as idx:
        for i, start, (shape, colour) in only_video[:4]:
            _, _, results = idx.search(encoder.encode_texts([f"a {colour} {shape}"]), 5)
            found = [(os.path.basename(r["path"]), r["kind"], r.get("t_start")) for r in results[0]]
            assert (clips[i], "segment", float(start)) in found[:3], (colour, shape, found)
            assert [f for f in found if f[1] == "segment"][0] == (clips[i], "segment", float(start))

    assert demo.main(["--out", str(tmp_path), "--n", "12", "--no-serve"]) == 0  # reruns reuse the images
    assert "reusing 12 images" in capsys.readouterr().out
    assert sorted(f.name for f in (tmp_path / "images").iterdir()) == files


def test_page_url() -> None:
    assert demo.page_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert demo.page_url("0.0.0.0", 9000) == "http://127.0.0.1:9000/"  # an address a browser can open


def test_curl_examples_are_valid_json_bodies() -> None:
    text = demo.curl_examples("127.0.0.1", 8000, Path("demo_data/images/000000.png"))
    bodies = [line.split("-d '", 1)[1].rsplit("'", 1)[0] for line in text.splitlines() if "-d '" in line]
    for body in bodies:
        if "$(base64" not in body:
            json.loads(body)
    assert len(bodies) == 5
    assert json.loads(bodies[-1]) == {"question": "Which picture has a red circle?"}  # grounded /chat
