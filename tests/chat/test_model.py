"""Loading original InternVL-Chat checkpoints into native transformers classes: parity with the fixtures.

Vision features and prefill / per-step logits are compared with the tolerances the fixture READMEs give
(measured, not guessed), feeding the stored reference ``pixel_values.*`` tiles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen2Config

from chat import load_chat_model
from chat.convert import (
    CheckpointError,
    chat_settings,
    native_config,
    split_internlm2_wqkv,
    text_config,
    vision_config,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IMAGE_KEYS = ["wide", "tall", "tiny", "rgba"]


def _sample_keys(golden) -> list[tuple[str, list[str], str]]:
    """(expected key, images, query) for every chat case and both batch samples."""
    out = []
    for case in golden.prompts["cases"]:
        if case["method"] == "chat":
            out.append((case["name"], case["images"], case["query"]))
        else:
            for i, (img, query) in enumerate(zip(case["images"], case["queries"], strict=True)):
                out.append((f"batch.s{i}", [img], query))
    return out


# ---------------------------------------------------------------------------- loading


def test_native_config_facts(golden) -> None:
    cfg = golden.model.model.config
    assert cfg.tie_word_embeddings is False and cfg.text_config.tie_word_embeddings is False
    assert cfg.image_token_id == golden.prompts["img_context_token_id"]
    assert cfg.image_seq_length == golden.model.num_image_token == golden.prompts["num_image_token"]
    assert cfg.vision_config.use_mean_pooling is True
    assert golden.model.stop_token_id == golden.prompts["eos_token_id"]
    expected_text = {"internvl_chat_qwen2_tiny": Qwen2Config}.get(golden.name, LlamaConfig)
    assert type(cfg.text_config) is expected_text
    # the lm head is its own tensor, not the embedding
    lm = golden.model.model.lm_head.weight
    emb = golden.model.model.get_input_embeddings().weight
    assert lm.data_ptr() != emb.data_ptr() and not torch.equal(lm, emb)


def test_internlm2_config_becomes_llama_with_dynamic_rope() -> None:
    config = json.loads((FIXTURES / "internvl_chat_internlm2_tiny" / "config.json").read_text())
    tc = text_config(config)
    assert isinstance(tc, LlamaConfig)
    assert tc.rope_parameters["rope_type"] == "dynamic" and tc.rope_parameters["factor"] == 2.0
    assert tc.rope_parameters["rope_theta"] == 1_000_000 and tc.attention_bias is False
    assert tc.rms_norm_eps == 1e-5 and tc.num_key_value_heads == 2


def test_internlm2_wqkv_split_is_grouped_per_kv_head() -> None:
    # README layout (n_kv 2, g 2, d 8): rows 0-7 q0, 8-15 q1, 16-23 k0, 24-31 v0, 32-39 q2, 40-47 q3, ...
    rows = torch.arange(64, dtype=torch.float32)[:, None].expand(64, 3)
    q, k, v = split_internlm2_wqkv(rows, num_heads=4, num_kv_heads=2)
    assert q[:, 0].tolist() == list(range(0, 16)) + list(range(32, 48))
    assert k[:, 0].tolist() == list(range(16, 24)) + list(range(48, 56))
    assert v[:, 0].tolist() == list(range(24, 32)) + list(range(56, 64))
    qb, kb, vb = split_internlm2_wqkv(torch.arange(64.0), num_heads=4, num_kv_heads=2)  # biases too
    assert torch.equal(qb, q[:, 0]) and torch.equal(kb, k[:, 0]) and torch.equal(vb, v[:, 0])
    with pytest.raises(CheckpointError, match="wqkv"):
        split_internlm2_wqkv(torch.zeros(63, 4), num_heads=4, num_kv_heads=2)


def _copy_fixture(tmp_path: Path, name: str = "internvl_chat_tiny") -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst, ignore=shutil.ignore_patterns("images", "checks", "*.safetensors"))
    shutil.copy(FIXTURES / name / "model.safetensors", dst / "model.safetensors")
    return dst


def test_unexpected_weight_is_reported(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["vision_model.encoder.layers.0.attn.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected_keys.*attn.extra"):
        load_chat_model(folder, device="cpu")


def test_missing_weight_is_reported(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing_keys.*layers.1.mlp.up_proj"):
        load_chat_model(folder, device="cpu")


def test_sharded_checkpoint_loads_identically(tmp_path: Path, golden) -> None:
    folder = _copy_fixture(tmp_path, golden.name)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    sharded = load_chat_model(folder, device="cpu", dtype=torch.float32)
    for (name, a), (_, b) in zip(
        sharded.model.state_dict().items(), golden.model.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_bad_folders_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_chat_model(tmp_path, device="cpu")
    folder = _copy_fixture(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_chat_model(folder, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["architectures"] = ["MixtralForCausalLM"]
    with pytest.raises(CheckpointError, match="unsupported LLM"):
        native_config(config, image_token_id=1)


# ---------------------------------------------------------------------------- vision


@pytest.mark.parametrize("image", IMAGE_KEYS)
def test_vision_features_match_reference(golden, image: str) -> None:
    model = golden.model
    pixels = golden.tiles[f"pixel_values.{image}"]
    captured = {}
    hook = model.model.model.multi_modal_projector.register_forward_hook(
        lambda mod, args, out: captured.update(shuffled=args[0])
    )
    try:
        embeds = model.image_features(pixels)
        with torch.inference_mode():
            hidden = model.model.model.vision_tower(pixel_values=pixels).last_hidden_state
    finally:
        hook.remove()
    golden.check_vision(hidden, f"vision.{image}.vit_last_hidden_state")
    golden.check_vision(captured["shuffled"], f"vision.{image}.pixel_shuffled")
    golden.check_vision(embeds, f"vision.{image}.vit_embeds")


# ---------------------------------------------------------------------------- prompts and logits


def test_prompts_and_token_ids(golden) -> None:
    model = golden.model
    for case in golden.prompts["cases"]:
        if case["method"] == "chat":
            prompt = model.build_prompt(
                case["question"], case["effective_num_patches_list"], case["history_in"]
            )
            assert prompt == case["query"], case["name"]
            ids = model.encode([prompt])["input_ids"][0]
            assert ids.tolist() == golden.expected[f"{case['name']}.input_ids"].tolist(), case["name"]
        else:
            enc = model.encode(case["queries"])
            assert enc["input_ids"].tolist() == case["input_ids_padded"]
            assert enc["attention_mask"].tolist() == case["attention_mask"]


def test_prefill_logits_match_reference(golden) -> None:
    model, exp = golden.model, golden.expected
    probe = exp["vocab_probe_ids"]
    for key, images, _ in _sample_keys(golden):
        ids = exp[f"{key}.input_ids"][None]
        pixels = golden.pixel_values(images)
        with torch.inference_mode():
            logits = model.model(input_ids=ids, pixel_values=pixels).logits[0]
        golden.check_logits(logits[-1], f"{key}.prefill_last_logits")
        golden.check_logits(logits.logsumexp(-1), f"{key}.prefill_logsumexp")
        golden.check_logits(logits[:, probe], f"{key}.prefill_logits_probe")


def test_left_padded_batch_prefill_matches_reference(golden) -> None:
    model = golden.model
    case = golden.cases["batch"]
    enc = model.encode(case["queries"])
    with torch.inference_mode():
        logits = model.model(**enc, pixel_values=golden.pixel_values(case["images"])).logits
    for i, sample in enumerate(case["samples"]):
        valid = logits[i, sample["n_pad_left"] :]
        key = f"batch.s{i}"
        golden.check_logits(valid[-1], f"{key}.prefill_last_logits")
        golden.check_logits(valid.logsumexp(-1), f"{key}.prefill_logsumexp")


def test_step_logits_match_reference(golden) -> None:
    """Per-step (KV-cached) logits that choose each greedy token."""
    model, exp = golden.model, golden.expected
    probe = exp["vocab_probe_ids"]
    config = model.generation_config(max_new_tokens=8)
    config.output_logits, config.return_dict_in_generate = True, True
    for key, images, _ in _sample_keys(golden):
        ids = exp[f"{key}.input_ids"][None]
        pixels = golden.pixel_values(images)
        extra = {} if pixels is None else {"pixel_values": pixels}
        with torch.inference_mode():
            out = model.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **extra
            )
        steps = torch.cat(out.logits)  # [T, V]
        n = len(exp[f"{key}.generated_ids"])
        assert steps.shape[0] == n, key
        golden.check_logits(steps[:, probe], f"{key}.step_logits_probe")
        golden.check_logits(steps.max(-1).values, f"{key}.step_max_logit")
        golden.check_logits(steps.logsumexp(-1), f"{key}.step_logsumexp")


def test_hf_native_folder_roundtrip(tmp_path: Path, golden_tiny) -> None:
    """A folder in the HF-native format (as save_pretrained writes it) loads too and answers the same."""
    folder = tmp_path / "hf_native"
    golden_tiny.model.model.save_pretrained(folder)
    golden_tiny.model.tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "internvl"
    native = load_chat_model(folder, device="cpu", dtype=torch.float32)
    assert native.template.name == "internvl2_5"  # HF-native folders carry no template: InternVL2.5/3 default
    native = load_chat_model(folder, device="cpu", dtype=torch.float32, template="Hermes-2")
    case = golden_tiny.cases["two_images"]
    answer = native.chat(
        case["question"],
        pixel_values=golden_tiny.pixel_values(case["images"]),
        num_patches_list=case["num_patches_list_arg"],
        max_new_tokens=8,
    )
    assert answer == case["response"]


def test_unknown_model_type_is_refused(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("llm_config")
    config["model_type"] = "llava"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="neither 'internvl_chat'"):
        load_chat_model(folder, device="cpu")


def test_tied_head_only_when_the_checkpoint_has_none(tmp_path: Path) -> None:
    folder = _copy_fixture(tmp_path, "internvl_chat_qwen2_tiny")
    state = load_file(folder / "model.safetensors")
    del state["language_model.lm_head.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing_keys.*lm_head"):  # llm_config says untied
        load_chat_model(folder, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    model = load_chat_model(folder, device="cpu").model
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_config_defaults_are_the_reference_defaults() -> None:
    config = json.loads((FIXTURES / "internvl_chat_tiny" / "config.json").read_text())
    for key in ("qk_normalization", "norm_type", "qkv_bias"):
        config["vision_config"].pop(key)
    for key in ("ps_version", "dynamic_image_size", "use_thumbnail", "max_dynamic_patch"):
        config.pop(key)
    vc = vision_config(config)
    assert (
        vc.use_qk_norm is True and vc.norm_type == "rms_norm" and vc.attention_bias is False
    )  # InternViT-6B
    settings = chat_settings(config)
    assert (settings.ps_version, settings.dynamic_image_size, settings.use_thumbnail) == ("v1", False, False)
    assert settings.max_dynamic_patch == 6
    config.pop("template")
    with pytest.raises(CheckpointError, match="template"):
        chat_settings(config)


def test_internvit_6b_options_map_to_native_vision(tmp_path: Path) -> None:
    """qk-norm / rms_norm / no qkv bias (InternViT-6B); the q/k RMSNorm uses the config's layer_norm_eps."""
    from transformers import InternVLForConditionalGeneration

    from chat.loader import _match_qk_norm_eps

    config = json.loads((FIXTURES / "internvl_chat_tiny" / "config.json").read_text())
    config["vision_config"].update(
        qk_normalization=True, norm_type="rms_norm", qkv_bias=False, layer_norm_eps=1e-5
    )
    model = InternVLForConditionalGeneration(native_config(config, image_token_id=32005))
    _match_qk_norm_eps(model, config)
    layer = model.model.vision_tower.encoder.layer[0]
    assert layer.attention.q_proj.bias is None and layer.attention.projection_layer.bias is not None
    assert layer.attention.q_norm.weight.shape == (32,)  # over all heads, as InternViT
    assert layer.attention.q_norm.variance_epsilon == layer.attention.k_norm.variance_epsilon == 1e-5
    assert type(layer.layernorm_before).__name__ == "InternVLVisionRMSNorm"


def test_gpu_options_are_guarded_on_cpu() -> None:
    """bf16 / flash-attn / device_map / bitsandbytes only where they apply; clear errors otherwise."""
    import importlib.util

    from chat.loader import attention_implementation, default_device_map, default_dtype, quantization_config

    cpu = torch.device("cpu")
    assert default_dtype(cpu) == torch.float32
    assert attention_implementation(cpu, torch.bfloat16) == "sdpa"
    assert default_device_map(cpu, 10, torch.float32, quantized=False) is None
    with pytest.raises(ValueError, match="CUDA"):
        default_device_map(cpu, 10, torch.float32, quantized=True)
    assert quantization_config(None) is None
    with pytest.raises(ValueError, match="quantization must be"):
        quantization_config("3bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="bitsandbytes"):
            quantization_config("4bit")
