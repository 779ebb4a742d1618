"""InternVLModel from configs: every config option, persistence (single/sharded), strict loading, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_helpers import TINY
from safetensors.torch import load_file, save_file

from retrieval.errors import WeightMismatchError
from retrieval.internvl import InternVLConfig, InternVLModel
from retrieval.internvl.vision import resize_position_embedding


def tiny_config(vision: dict | None = None, **top: object) -> InternVLConfig:
    base = {
        "model_type": "internvl",
        "vision_config": {"hidden_size": 24, "num_attention_heads": 3, "num_hidden_layers": 2,
                          "intermediate_size": 48, "image_size": 28, "patch_size": 14, **(vision or {})},
        "qllama_config": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
                          "num_hidden_layers": 3, "intermediate_size": 40, "vocab_size": 50},
        "clip_embed_dim": 8, "attn_pool_num_heads": 2, "num_query_token": 4,
    }  # fmt: skip
    base.update(top)
    return InternVLConfig.from_dict(base)


def _inputs(config: InternVLConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = config.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)
    ids = torch.tensor([[1, 7, 9, 2, 0, 0], [1, 5, 6, 8, 11, 2]])
    return pixels, ids


def test_config_round_trip_keeps_layout(tmp_path: Path) -> None:
    original = json.loads((TINY / "config.json").read_text())
    config = InternVLConfig.from_pretrained(TINY)
    assert config.vision_config.hidden_size == original["vision_config"]["hidden_size"]
    assert config.qllama_config.num_query_token == original["num_query_token"]
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():  # every published key survives, nested ones too
        if isinstance(value, dict):
            assert {k: written[key].get(k) for k in value} == value, key
        else:
            assert written[key] == value, key
    assert written["vision_config"]["norm_type"] == "rms_norm"
    assert InternVLConfig.from_pretrained(tmp_path).to_dict() == written


def test_config_rejects_other_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type"):
        InternVLConfig.from_pretrained(tmp_path)


def test_parameter_names_equal_checkpoint() -> None:
    model = InternVLModel(InternVLConfig.from_pretrained(TINY))
    stored = load_file(str(TINY / "model.safetensors"))
    assert set(model.state_dict()) == set(stored)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in stored.items()
    }


@pytest.mark.parametrize(
    "vision",
    [
        {},
        {"qkv_bias": True},
        {"norm_type": "layer_norm"},
        {"qk_normalization": False},
        {"hidden_act": "gelu"},
    ],
    ids=["default", "qkv_bias", "layer_norm", "no_qk_norm", "gelu"],
)
def test_variants_build_and_round_trip(tmp_path: Path, vision: dict) -> None:
    config = tiny_config(vision)
    model = InternVLModel(config).eval()
    names = set(model.state_dict())
    layer = "vision_model.encoder.layers.0."
    assert (layer + "attn.qkv.bias" in names) == bool(vision.get("qkv_bias"))
    assert (layer + "norm1.bias" in names) == (vision.get("norm_type") == "layer_norm")
    assert (layer + "attn.q_norm.weight" in names) == vision.get("qk_normalization", True)
    # cross-attention in layers i % frequency == 0, k/v width = vision width
    assert "qllama.model.layers.0.cross_attn.k_proj.weight" in names
    assert "qllama.model.layers.1.cross_attn.k_proj.weight" not in names
    assert model.state_dict()["qllama.model.layers.2.cross_attn.norm2.weight"].shape == (24,)
    model.save_pretrained(tmp_path)
    loaded = InternVLModel.from_pretrained(tmp_path)
    pixels, ids = _inputs(config)
    with torch.no_grad():
        for fn in ("encode_image_c", "encode_image_g"):
            assert torch.equal(getattr(model, fn)(pixels), getattr(loaded, fn)(pixels)), fn
        assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))


def test_random_init_is_sane_and_trainable() -> None:
    config = tiny_config()
    model = InternVLModel(config)
    pixels, ids = _inputs(config)
    image, text = model.encode_image_g(pixels), model.encode_text(ids)
    assert image.shape == (2, 8) and text.shape == (2, 8)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    assert not torch.allclose(image[0], image[1]) and not torch.allclose(text[0], text[1])
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(1 / 0.07))
    loss = model(pixels, ids)[0].logsumexp(1).mean() + image.sum()
    loss.backward()
    for name in (
        "query_tokens",
        "text_projection",
        "logit_scale",
        "clip_projector2.cross_attn.q_bias",
        "vision_model.embeddings.patch_embedding.weight",
        "qllama.model.layers.0.cross_attn.k_proj.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_query_tokens_see_the_image_with_few_queries() -> None:
    """Unlike the reference (which skips cross-attention below 96 positions), queries always cross-attend."""
    config = tiny_config(num_query_token=3)
    model = InternVLModel(config).eval()
    pixels, _ = _inputs(config)
    with torch.no_grad():
        tokens = model.vision_tokens(pixels)  # two different images
        queries = model.query_hidden_states(tokens)
    assert queries.shape == (2, 3, 16)
    assert (queries[0] - queries[1]).abs().max() > 1e-3, "query outputs must depend on the image"


def test_text_padding_does_not_change_embedding() -> None:
    config = tiny_config()
    model = InternVLModel(config).eval()
    short = torch.tensor([[1, 7, 9, 2]])
    padded = torch.tensor([[1, 7, 9, 2, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(short), model.encode_text(padded), rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    state = load_file(str(TINY / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((TINY / "config.json").read_text())
    sharded = InternVLModel.from_pretrained(tmp_path)
    single = InternVLModel.from_pretrained(TINY)
    for k, v in single.state_dict().items():
        assert torch.equal(v, sharded.state_dict()[k]), k


def _write(folder: Path, config: InternVLConfig, state: dict) -> None:
    folder.mkdir(exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_and_unexpected_weights_are_listed(tmp_path: Path) -> None:
    config = InternVLConfig.from_pretrained(TINY)
    state = load_file(str(TINY / "model.safetensors"))
    state.pop("text_projection")
    state.pop("vision_model.encoder.layers.1.ls2")
    state["surprise.weight"] = torch.zeros(2)
    _write(tmp_path / "bad", config, state)
    with pytest.raises(WeightMismatchError) as info:
        InternVLModel.from_pretrained(tmp_path / "bad")
    message = str(info.value)
    assert "text_projection" in message and "vision_model.encoder.layers.1.ls2" in message
    assert (
        "surprise.weight" in message
        and "missing weights (2)" in message
        and "unexpected weights (1)" in message
    )
    assert info.value.missing == ["text_projection", "vision_model.encoder.layers.1.ls2"]


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    config = InternVLConfig.from_pretrained(TINY)
    state = load_file(str(TINY / "model.safetensors"))
    width = config.qllama_config.hidden_size
    state["itm_head.weight"] = torch.zeros(3, width)
    _write(tmp_path / "bad", config, state)
    with pytest.raises(WeightMismatchError, match=rf"itm_head.weight \(3, {width}\) != \(2, {width}\)"):
        InternVLModel.from_pretrained(tmp_path / "bad")


def test_force_image_size_resizes_stored_position_embedding(tmp_path: Path) -> None:
    config = tiny_config()  # 28 px, grid 2
    model = InternVLModel(config)
    model.save_pretrained(tmp_path / "m")
    forced = tiny_config(force_image_size=42)  # grid 3
    forced.save_pretrained(tmp_path / "m")
    loaded = InternVLModel.from_pretrained(tmp_path / "m")
    pos = loaded.vision_model.embeddings.position_embedding
    stored = model.vision_model.embeddings.position_embedding.detach()
    assert pos.shape == (1, 10, 24)
    assert torch.equal(pos, resize_position_embedding(stored, 2, 3))
    assert torch.equal(pos[:, :1], stored[:, :1])
    assert loaded.encode_image_c(torch.zeros(1, 3, 42, 42)).shape == (1, 8)
    with pytest.raises(ValueError, match="42, 42"):
        loaded.encode_image_c(torch.zeros(1, 3, 28, 28))
    # a checkpoint saved at the forced size (what the reference writes) loads as stored
    loaded.save_pretrained(tmp_path / "n")
    again = InternVLModel.from_pretrained(tmp_path / "n")
    assert torch.equal(again.vision_model.embeddings.position_embedding, pos)


def test_resize_position_embedding_keeps_constant_grid() -> None:
    pos = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 16, 4), 2.0)], dim=1)
    out = resize_position_embedding(pos, 4, 6)
    assert out.shape == (1, 37, 4)
    torch.testing.assert_close(out[:, 1:], torch.full((1, 36, 4), 2.0))
    assert torch.equal(out[:, 0], pos[:, 0])


def test_half_precision_load_keeps_float32_rotary() -> None:
    model = InternVLModel.from_pretrained(TINY, dtype=torch.bfloat16)
    assert model.logit_scale.dtype == torch.bfloat16
    assert model.qllama.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.tensor([[1, 5, 2, 0]])
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(ids).float()).all()


@pytest.mark.parametrize(
    ("saved_as", "config_says"), [("layer_norm", "rms_norm"), ("rms_norm", "layer_norm")]
)
def test_norm_type_follows_the_stored_weights(tmp_path: Path, saved_as: str, config_says: str) -> None:
    """clip_benchmark's InternViT ignores norm_type (RMSNorm, no bias); later versions honour it (bias)."""
    model = InternVLModel(tiny_config({"norm_type": saved_as}))
    model.save_pretrained(tmp_path)
    tiny_config({"norm_type": config_says}).save_pretrained(tmp_path)
    loaded = InternVLModel.from_pretrained(tmp_path)
    assert loaded.config.vision_config.norm_type == saved_as
    pixels, _ = _inputs(loaded.config)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image_c(pixels), model.eval().encode_image_c(pixels))
