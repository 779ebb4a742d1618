"""The procedural shapes dataset: determinism, labels, captions, rendering."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import generate_shapes as gs
import numpy as np
import pytest
import sentencepiece as spm
import shapes_vocab as vocab
from PIL import Image

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "internvl_cg_tiny"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed, workers in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1)):
        gs.main(["--out", str(tmp_path / name), "--n", "12", "--seed", str(seed), "--workers", str(workers)])
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # worker processes change nothing
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_metadata_and_labels(tmp_path: Path) -> None:
    gs.main(["--out", str(tmp_path), "--n", "20", "--seed", "1"])
    with open(tmp_path / "captions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert set(rows[0]) == set(gs.FIELDS)
    assert {r["language"] for r in rows} == set(vocab.LANGUAGES)
    for r in rows:
        im = Image.open(tmp_path / r["file"])
        assert im.size == (int(r["width"]), int(r["height"])) and im.mode == "RGB"
        assert r["shape"] in vocab.SHAPES and r["colour"] in vocab.COLOURS
    labels = json.loads((tmp_path / "labels.json").read_text(encoding="utf-8"))
    n_classes = len(vocab.SHAPES) * len(vocab.COLOURS)
    assert len(vocab.SHAPES) >= 5 and len(vocab.COLOURS) >= 8
    assert len(labels["classes"]) == n_classes
    for spec in labels["languages"].values():
        assert len(set(spec["labels"])) == n_classes  # every class has a distinct name in every language
        assert all("{}" in t for t in spec["templates"])


def test_labels_are_natural_phrases() -> None:
    assert vocab.label("circle", "red", "en") == "red circle"
    assert vocab.label("circle", "red", "zh") == "红色的圆形"
    assert vocab.label("circle", "red", "ja") == "赤い円"
    assert vocab.label("star", "red", "es") == "estrella roja"  # gender agreement
    assert vocab.label("circle", "green", "fr") == "cercle vert"
    assert vocab.with_article("orange star", "star", "en") == "an orange star"


def test_every_caption_is_short_for_the_real_tokenizer() -> None:
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    rng = random.Random(0)
    longest = 0
    for lang in vocab.LANGUAGES:
        for _ in range(300):
            spec = {
                "shape": rng.choice(vocab.SHAPES),
                "colour": rng.choice(list(vocab.COLOURS)),
                "size": rng.choice(vocab.SIZES),
                "position": rng.choice(vocab.POSITIONS),
                "background": rng.choice(vocab.BACKGROUNDS),
            }
            text = vocab.caption(spec, lang, rng)
            longest = max(longest, len(sp.encode("summarize:" + text)) + 2)  # + BOS/EOS
            assert sp.unk_id() not in sp.encode(text)
    assert longest <= 40  # the model reads 80 tokens; nothing is ever truncated


def test_mask_area_matches_geometry() -> None:
    m = gs.shape_mask("circle", 60, 60, 30.0, 30.0, 20.0, 0.0)
    assert m.shape == (60, 60) and 0.0 <= m.min() and m.max() <= 1.0
    assert abs(m.sum() - np.pi * 20**2) / (np.pi * 20**2) < 0.01
    sq = gs.shape_mask("square", 60, 60, 30.0, 30.0, 20.0, 0.0)
    assert abs(sq.sum() - (2 * 0.85 * 20) ** 2) < 0.02 * (2 * 0.85 * 20) ** 2
    for shape in vocab.SHAPES:  # every shape is drawn and lies inside its radius
        mask = gs.shape_mask(shape, 50, 50, 25.0, 25.0, 15.0, 0.2)
        assert mask.sum() > 100 and mask[:8].sum() == 0 and mask[-8:].sum() == 0


def test_shape_colour_is_on_the_pixels(tmp_path: Path) -> None:
    rng = random.Random(5)
    spec = gs.sample_spec(rng) | {
        "colour": "blue",
        "background": "plain",
        "width": 80,
        "height": 80,
        "cx": 40.0,
        "cy": 40.0,
        "r": 25.0,
        "shape": "circle",
    }
    px = np.asarray(gs.render(spec, rng)).astype(int)
    r, g, b = px[40, 40]
    assert b > 150 and r < 100 and g < 130


def test_bad_arguments_exit_with_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        gs.main(["--out", str(tmp_path), "--n", "0"])
    with pytest.raises(SystemExit):
        gs.main(["--out", str(tmp_path), "--languages", "en,xx"])
    with pytest.raises(SystemExit):
        gs.main(["--out", str(tmp_path), "--workers", "0"])
