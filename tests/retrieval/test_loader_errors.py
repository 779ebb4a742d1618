"""load_encoder: backend detection, the demo path, and a clear error (type + message) for each bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_helpers import TINY
from safetensors.torch import load_file, save_file

from retrieval import Encoder, load_encoder
from retrieval.errors import (
    ImageDecodeError,
    ModelLoadError,
    TokenizerNotFoundError,
    UnknownModelTypeError,
    WeightMismatchError,
)
from retrieval.internvl import InternVLConfig
from retrieval.loader import DEMO_MODEL_DIR

CONFIG = InternVLConfig.from_pretrained(TINY)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return load_encoder(TINY, device="cpu")


def _copy_fixture(dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        if name not in skip:
            shutil.copyfile(TINY / name, dst / name)
    return dst


def test_defaults(encoder: Encoder) -> None:
    assert encoder.mode == "internvl-c" and str(encoder.device) == "cpu"
    assert encoder.name.endswith(":internvl-c") and encoder.embed_dim == CONFIG.clip_embed_dim
    assert encoder.dtype.is_floating_point and encoder.model.training is False


def test_mode_is_case_insensitive_and_validated() -> None:
    assert load_encoder(TINY, mode="InternVL-G", device="cpu").mode == "internvl-g"
    with pytest.raises(ValueError, match="not valid for an InternVL model"):
        load_encoder(TINY, mode="openclip")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_encoder(tmp_path / "nope")


def test_file_instead_of_folder() -> None:
    with pytest.raises(NotADirectoryError, match="not a folder"):
        load_encoder(TINY / "config.json")


def test_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnknownModelTypeError, match="unsupported model_type 'bert'"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UnknownModelTypeError, match="not a supported model folder"):
        load_encoder(tmp_path)


def test_broken_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_encoder(tmp_path)


def test_missing_tokenizer(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path / "m", skip=("tokenizer.model",))
    with pytest.raises(TokenizerNotFoundError, match="tokenizer.model"):
        load_encoder(folder)


def test_missing_weights_file(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path / "m", skip=("model.safetensors",))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no model.safetensors .*pytorch_model.bin"):
        load_encoder(folder)


def test_corrupt_weights_file(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path / "m", skip=("model.safetensors",))
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_encoder(folder)


def test_missing_and_unexpected_weight_names_listed(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path / "m", skip=("model.safetensors",))
    state = load_file(str(TINY / "model.safetensors"))
    del state["clip_projector.norm1_q.weight"]
    state["qllama.model.layers.9.mlp.up_proj.weight"] = state[
        "qllama.model.layers.0.mlp.up_proj.weight"
    ].clone()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightMismatchError) as info:
        load_encoder(folder)
    assert info.value.missing == ["clip_projector.norm1_q.weight"]
    assert info.value.unexpected == ["qllama.model.layers.9.mlp.up_proj.weight"]
    assert "clip_projector.norm1_q.weight" in str(info.value) and "layers.9.mlp" in str(info.value)


def test_openclip_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_encoder(tmp_path)


def test_demo_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("retrieval.loader.DEMO_MODEL_DIR", tmp_path / "demo_model")
    with pytest.raises(FileNotFoundError, match="demo model is not built"):
        load_encoder("demo")
    _copy_fixture(tmp_path / "demo_model")
    assert load_encoder("demo", device="cpu").embed_dim == CONFIG.clip_embed_dim
    assert DEMO_MODEL_DIR.name == "demo_model" and DEMO_MODEL_DIR.parent.name == "retrieval"


def test_unreadable_image_file(encoder: Encoder, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageDecodeError) as info:
        encoder.encode_images([TINY / "images" / "img0_rgb_97x61.png", bad])
    assert info.value.reason == "undecodable" and "broken.jpg" in str(info.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        encoder.encode_images([empty])


def test_bad_arguments(encoder: Encoder) -> None:
    size = CONFIG.image_size
    with pytest.raises(TypeError, match="single str"):
        encoder.encode_texts("a cat")
    with pytest.raises(TypeError, match="must be str"):
        encoder.encode_texts(["ok", None])
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode_texts(["ok"], batch_size=0)
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        encoder.encode_pixels(np.zeros((1, 3, size, size)))
    with pytest.raises(ValueError, match=f"{size}, {size}"):
        encoder.encode_pixels(torch.zeros(1, 3, size + 14, size + 14))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_encoder(TINY, dtype="int8")


def test_empty_inputs(encoder: Encoder) -> None:
    assert encoder.encode_texts([]).shape == (0, CONFIG.clip_embed_dim)
    assert encoder.encode_images([]).shape == (0, CONFIG.clip_embed_dim)
