"""Fine-tuning end to end on tiny settings: the loss falls, the checkpoint reloads with identical outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import finetune_contrastive as ft
import numpy as np
import pytest
import torch

from retrieval import load_encoder
from retrieval.internvl import InternVLModel
from retrieval.training import trim_padding


def test_a_few_steps_lower_the_loss(trained: dict) -> None:
    losses = [h["loss"] for h in trained["history"]]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert "recall@5" in trained["history"][5] and "recall@5" in trained["history"][-1]


def test_checkpoint_reloads_through_load_encoder_with_identical_outputs(trained: dict, shapes: Path) -> None:
    out = Path(trained["out"])
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    model: InternVLModel = trained["model"]
    encoder = load_encoder(out, device="cpu")
    texts = ["a red circle", "红色的圆形", "赤い円", "una estrella roja"]
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted((shapes / "images").iterdir())[:4]]
    pixels = torch.stack([encoder.preprocess(im) for im in images])
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(model.encode_image_c(pixels), dim=-1).numpy()
        ids = ft.InternVLTokenizer.from_pretrained(out)(texts)
        want_txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_images(images), want_img, rtol=0, atol=1e-6)
    np.testing.assert_allclose(encoder.encode_texts(texts), want_txt, rtol=0, atol=1e-6)
    assert encoder.logit_scale == pytest.approx(model.logit_scale.detach().exp().item(), rel=1e-6)
    load_encoder(out, mode="internvl-g", device="cpu").encode_texts(texts)  # G mode loads (strict) too


def test_same_seed_same_weights(trained: dict, tmp_path: Path) -> None:
    argv = list(trained["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    again = ft.main(argv)
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in trained["history"]]
    for (name, a), (_, b) in zip(
        trained["model"].state_dict().items(), again["model"].state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_trimmed_padding_gives_the_same_text_embedding(trained: dict) -> None:
    model: InternVLModel = trained["model"]
    ids = ft.InternVLTokenizer.from_pretrained(trained["out"])(
        ["a red circle", "画像の左上に赤い円があります"]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(trim_padding(ids)), model.encode_text(ids), rtol=1e-5, atol=1e-6
        )


def test_missing_captions_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no captions.csv"):
        ft.main(["--data", str(tmp_path), "--out", str(tmp_path / "m"), "--steps", "1"])


def test_fresh_model_init_options_train_and_save(trained: dict, shapes: Path, tmp_path: Path) -> None:
    config = Path(trained["argv"][trained["argv"].index("--config") + 1])
    out = tmp_path / "fresh"
    argv = ["--data", str(shapes), "--config", str(config), "--out", str(out), "--steps", "3"]
    argv += ["--batch-size", "8", "--threads", "1", "--sincos-pos", "--mimetic-init", "--pool-qk-std", "0.2"]
    result = ft.main(argv)
    assert len(result["history"]) == 3 and all(np.isfinite(h["loss"]) for h in result["history"])
    assert (out / "model.safetensors").is_file()
    assert "--mimetic-init" in json.loads((out / "training.json").read_text())["command"]


def test_fresh_model_init_options_refused_with_init(trained: dict, tmp_path: Path) -> None:
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "m"), "--init", trained["out"]]
    for extra in (["--mimetic-init"], ["--pool-qk-std", "0.2"], ["--sincos-pos"]):
        with pytest.raises(SystemExit):
            ft.main([*base, *extra])


def test_load_pairs_same_with_worker_processes_and_skips_bad_files(shapes: Path, tmp_path: Path) -> None:
    from retrieval.internvl import build_transform

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "images" / "000003.png").write_bytes(b"not an image")
    transform = build_transform("retrieval", 32)
    serial = ft.load_pairs(data, None, transform, 0, "test")
    parallel = ft.load_pairs(data, None, transform, 2, "test")
    assert torch.equal(serial[0], parallel[0]) and serial[1] == parallel[1]
    assert len(serial[1]) == 15 and "images/000003.png" not in [r["file"] for r in serial[2]]
