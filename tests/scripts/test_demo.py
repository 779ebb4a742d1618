"""scripts/demo.py --no-serve: generates the demo folder and builds its index with the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import demo
import pytest

from retrieval.loader import DEMO_MODEL_DIR


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")
def test_demo_builds_the_index_without_serving(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert demo.main(["--out", str(tmp_path), "--n", "12", "--no-serve"]) == 0
    assert len(list((tmp_path / "images").iterdir())) == 12
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest  # the index helper's manifest exists and is JSON
    out = capsys.readouterr().out
    assert "红色的圆形" in out and "/classify" in out and "python -m api --index" in out
    assert demo.main(["--out", str(tmp_path), "--n", "12", "--no-serve"]) == 0  # reruns reuse the images
    assert "reusing 12 images" in capsys.readouterr().out


def test_curl_examples_are_valid_json_bodies() -> None:
    text = demo.curl_examples("127.0.0.1", 8000, Path("demo_data/images/000000.png"))
    bodies = [line.split("-d '", 1)[1].rsplit("'", 1)[0] for line in text.splitlines() if "-d '" in line]
    for body in bodies:
        if "$(base64" not in body:
            json.loads(body)
    assert len(bodies) == 4
