"""eval_zero_shot.py on a tiny labelled folder with a tiny trained model; the PIL-drawn check set."""

from __future__ import annotations

import json
from pathlib import Path

import eval_zero_shot as ev
import numpy as np
import pytest
import shapes_vocab as vocab


def test_eval_reports_every_language_and_recall(trained: dict, shapes: Path, tmp_path: Path, capsys) -> None:
    metrics = ev.main(
        [
            "--model",
            trained["out"],
            "--data",
            str(shapes),
            "--pil-n",
            "1",
            "--json",
            str(tmp_path / "m.json"),
            "--threads",
            "1",
        ]
    )
    assert set(metrics["accuracy"]) == set(vocab.LANGUAGES)
    assert all(0.0 <= a <= 1.0 for a in metrics["accuracy"].values())
    assert set(metrics["recall"]) == {"all", *vocab.LANGUAGES}
    r = metrics["recall"]["all"]
    assert 0.0 <= r[1] <= r[5] <= r[10] <= 1.0
    assert metrics["pil"]["n_images"] == len(vocab.SHAPES) * len(vocab.COLOURS)
    table = capsys.readouterr().out
    assert "| method | EN | ZH | JP | ES | FR | avg |" in table and "R@5" in table and "PIL-drawn" in table
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == 16


def test_recall_counts_same_class_images_as_relevant() -> None:
    class Fake:  # an encoder whose embeddings are one-hot class vectors
        logit_scale = 100.0

        def encode_images(self, images, batch_size=32):  # noqa: ANN001, ANN202
            return np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]

        def encode_texts(self, texts, batch_size=64):  # noqa: ANN001, ANN202
            onehot = {"red circle": 0, "blue square": 1, "pink star": 2}
            return np.eye(4, dtype=np.float32)[[onehot.get(t, 3) for t in texts]]

    records = [
        {"caption": c, "colour": c.split()[0], "shape": c.split()[1], "language": "en"}
        for c in ("red circle", "red circle", "blue square", "pink star")
    ]
    manifest = {
        "classes": ["red circle", "blue square", "pink star"],
        "languages": {"en": {"labels": ["red circle", "blue square", "pink star"], "templates": ["{}"]}},
    }
    m = ev.evaluate(Fake(), [None] * 4, records, manifest, pil_per_class=0)
    assert m["accuracy"]["en"] == 1.0
    assert m["recall"]["all"][1] == 1.0  # the second red circle's caption may retrieve the first image
    assert m["recall_exact_pair"][1] == pytest.approx(0.75)  # ...which is not its own pair


def test_pil_check_set_draws_every_class() -> None:
    classes = vocab.labels_manifest()["classes"]
    images, targets = ev.pil_check_set(classes, per_class=1)
    assert len(images) == len(classes) and targets == list(range(len(classes)))
    for image, cls in zip(images, classes, strict=True):
        px = np.asarray(image)
        assert image.mode == "RGB" and (px != 255).any(), cls  # something was drawn


def test_missing_labels_manifest_is_a_clear_error(shapes: Path, tmp_path: Path) -> None:
    (tmp_path / "captions.csv").write_text(
        (shapes / "captions.csv").read_text(encoding="utf-8"), encoding="utf-8"
    )
    with pytest.raises(FileNotFoundError, match="labels.json"):
        ev.load_labelled_folder(tmp_path)
