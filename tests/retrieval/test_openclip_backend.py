"""OpenCLIP backend: a tiny random model saved in the OpenCLIP folder layout loads through load_encoder
and gives exactly open_clip's own normalised outputs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from retrieval import load_encoder
from retrieval.errors import ModelLoadError, WeightMismatchError
from retrieval.openclip_backend import OpenCLIPEncoder

MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_openclip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**MODEL_CFG)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 255, (40, 57, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(rng.integers(0, 255, (20, 70), dtype=np.uint8), mode="L"),
    ]


def test_outputs_equal_open_clip(openclip_dir: Path) -> None:
    encoder = load_encoder(openclip_dir, device="cpu")
    assert isinstance(encoder, OpenCLIPEncoder) and encoder.mode == "openclip" and encoder.embed_dim == 16

    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(f"local-dir:{openclip_dir}")
    ref_model.eval()
    ref_tokenizer = open_clip.get_tokenizer(f"local-dir:{openclip_dir}")
    texts = ["a photo of a cat", "", "一只猫", "x " * 100]
    images = _images()
    with torch.no_grad():
        ref_img = ref_model.encode_image(torch.stack([ref_preprocess(im) for im in images]), normalize=True)
        ref_txt = ref_model.encode_text(ref_tokenizer(texts), normalize=True)
    # same batches as the reference run: bit-identical
    np.testing.assert_array_equal(encoder.encode_images(images), ref_img.numpy())
    np.testing.assert_array_equal(encoder.encode_texts(texts), ref_txt.numpy())
    # other batch splits only change GEMM blocking (float32 rounding)
    np.testing.assert_allclose(encoder.encode_images(images, batch_size=2), ref_img.numpy(), atol=1e-6)
    np.testing.assert_allclose(encoder.encode_texts(texts, batch_size=3), ref_txt.numpy(), atol=1e-6)
    assert encoder.logit_scale == pytest.approx(float(ref_model.logit_scale.detach().exp()))
    # the folder's preprocess_cfg (mean/std) is used
    assert list(encoder.image_transform.inner.transforms[-1].mean) == [0.5, 0.4, 0.3]


def test_transform_is_picklable_and_applies_exif(openclip_dir: Path) -> None:
    encoder = load_encoder(openclip_dir, device="cpu")
    transform = pickle.loads(pickle.dumps(encoder.image_transform))
    image = _images()[0]
    assert torch.equal(transform(image), encoder.preprocess(image))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    stored = _with_exif(image, exif)
    assert stored.getexif().get(0x0112) == 6
    upright = image.transpose(Image.Transpose.ROTATE_270)
    assert torch.equal(encoder.preprocess(stored), transform(upright))
    assert not torch.equal(encoder.preprocess(stored), transform(image))


def _with_exif(image: Image.Image, exif: Image.Exif) -> Image.Image:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buf.getvalue()))


def test_wrong_weights_are_reported(tmp_path: Path, openclip_dir: Path) -> None:
    (tmp_path / "open_clip_config.json").write_text((openclip_dir / "open_clip_config.json").read_text())
    weights = {"visual.conv1.weight": torch.zeros(32, 3, 8, 8), "logit_scale": torch.zeros(()),
               "extra.weight": torch.zeros(1)}  # fmt: skip
    save_file(weights, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(WeightMismatchError, match="missing weights") as info:
        load_encoder(tmp_path, device="cpu")
    assert "visual.proj" in info.value.missing and "visual.conv1.weight" not in info.value.missing
    assert info.value.unexpected == ["extra.weight"]


def test_openclip_rejects_internvl_mode(openclip_dir: Path) -> None:
    with pytest.raises(ValueError, match="not valid for an OpenCLIP model"):
        load_encoder(openclip_dir, mode="internvl-g")


def test_bad_openclip_config(tmp_path: Path, openclip_dir: Path) -> None:
    shutil.copyfile(openclip_dir / "open_clip_model.safetensors", tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": {}}}))
    with pytest.raises(ModelLoadError, match="embed_dim"):
        load_encoder(tmp_path)
    bad = {"model_cfg": {**MODEL_CFG, "text_cfg": {**MODEL_CFG["text_cfg"], "width": "wide"}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="open_clip cannot build"):
        load_encoder(tmp_path)
