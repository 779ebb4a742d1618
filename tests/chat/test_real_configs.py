"""The genuine InternVL2-1B ``config.json`` (``tests/fixtures/real_configs``, no weights) through the
converter on the ``meta`` device, and the reference's lm-head tying on a synthetic checkpoint whose head and
embeddings differ.

Tying, as transformers 4.37.2 loads the reference ``InternVLChatModel`` (checked by running 4.37.2 on a class
with the reference's ``base_model_prefix`` / ``get_input_embeddings`` / ``get_output_embeddings`` and real
``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` children, both stored tensors different):

* only the top-level ``tie_word_embeddings`` counts (absent: the ``PretrainedConfig`` default, true);
  ``llm_config.tie_word_embeddings`` never does (the nested LLM's ``tie_weights`` runs only when weights are
  initialised, which ``from_pretrained`` skips);
* top level false: embed_tokens and lm_head as stored;
* top level true: one shared tensor; with ``low_cpu_mem_usage=True`` (the reference's
  ``load_model_and_tokenizer``, and any ``device_map``) it is the stored ``embed_tokens``; a plain
  ``from_pretrained`` copies both names into the shared tensor and the later ``lm_head`` wins.

The loader follows the reference's own loader (``low_cpu_mem_usage=True``): head = stored ``embed_tokens``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from chat import load_chat_model
from chat.convert import (
    chat_settings,
    checkpoint_layout,
    convert_state_dict,
    native_config,
    reference_ties_head,
    tie_lm_head,
)
from chat.templates import get_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
INTERNVL2_1B = FIXTURES / "real_configs" / "InternVL2-1B" / "config.json"
#: real_configs/README.md: the published InternVL2-1B model.safetensors, with and without its lm head
PUBLISHED_BYTES = 1_876_395_376
PUBLISHED_BYTES_WITHOUT_HEAD = 1_604_629_280
IMG_CONTEXT_ID = 151648  # InternVL2-1B's <IMG_CONTEXT> (any id inside the vocabulary builds the same layout)
LOGIT_ATOL = LOGIT_RTOL = 1e-4  # fixture READMEs: |a - e| <= 1e-4 + 1e-4 |e|

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


def safetensors_size(shapes: dict[str, tuple[int, ...]], dtype: str = "BF16",
                     metadata: dict[str, str] | None = None) -> int:
    """Bytes of the safetensors file holding these tensors as safetensors writes it: 8-byte header length,
    the JSON header (``__metadata__`` first, tensors sorted by name for one dtype, compact separators,
    space-padded to a multiple of 8), then the data."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * _DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(text) + (-len(text)) % 8 + offset


def test_size_formula_is_what_safetensors_writes(tmp_path: Path) -> None:
    shapes = {"b.weight": (3, 5), "a.bias": (7,), "language_model.lm_head.weight": (11, 2), "x": (1, 1, 1)}
    tensors = {k: torch.zeros(v, dtype=torch.bfloat16) for k, v in shapes.items()}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "m.safetensors").stat().st_size == safetensors_size(shapes, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "fixture", ["internvl_chat_tiny", "internvl_chat_qwen2_tiny", "internvl_chat_internlm2_tiny",
                "internvl_chat_v12plus_tiny"],
)  # fmt: skip
def test_layout_is_what_the_fixture_checkpoints_store(fixture: str) -> None:
    from safetensors import safe_open

    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    with safe_open(FIXTURES / fixture / "model.safetensors", "pt") as f:
        stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert checkpoint_layout(config, image_token_id=32005) == stored


@pytest.fixture(scope="module")
def real_config() -> dict:
    return json.loads(INTERNVL2_1B.read_text())


def test_internvl2_1b_layout_is_the_published_file(real_config: dict) -> None:
    layout = checkpoint_layout(real_config, image_token_id=IMG_CONTEXT_ID)
    assert len(layout) == 637
    assert layout["language_model.lm_head.weight"] == layout["language_model.model.embed_tokens.weight"]
    assert layout["language_model.lm_head.weight"] == (151655, 896)
    assert layout["vision_model.encoder.layers.23.attn.qkv.weight"] == (3072, 1024)
    assert layout["mlp1.1.weight"] == (896, 4096)
    # transformers' save_pretrained writes {"format": "pt"} as the file's metadata
    assert safetensors_size(layout, metadata={"format": "pt"}) == PUBLISHED_BYTES
    no_head = {k: v for k, v in layout.items() if k != "language_model.lm_head.weight"}
    assert safetensors_size(no_head, metadata={"format": "pt"}) == PUBLISHED_BYTES_WITHOUT_HEAD


def test_internvl2_1b_converts_without_missing_unexpected_or_misshapen(real_config: dict) -> None:
    layout = checkpoint_layout(real_config, image_token_id=IMG_CONTEXT_ID)
    original = {
        name: torch.empty(shape, dtype=torch.bfloat16, device="meta") for name, shape in layout.items()
    }
    state, tied = tie_lm_head(convert_state_dict(original, real_config), real_config)
    assert tied and reference_ties_head(real_config)  # no top-level tie_word_embeddings: the default, true
    assert "lm_head.weight" not in state  # the stored head is not used: the head is embed_tokens
    with torch.device("meta"):
        native = InternVLForConditionalGeneration(
            native_config(real_config, image_token_id=IMG_CONTEXT_ID, tie_word_embeddings=tied)
        )
    expected = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    assert expected.pop("lm_head.weight") == (151655, 896)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert native.lm_head.weight is native.get_input_embeddings().weight


def test_internvl2_1b_chat_settings_are_the_model_cards(real_config: dict) -> None:
    settings = chat_settings(real_config)
    # model card: Hermes-2 template with its default system message, 448 px tiles, max_num=12, thumbnail,
    # 256 image tokens per tile ((448 / 14)^2 * 0.5^2), pixel shuffle v2, Qwen2 LLM
    assert settings.template == "Hermes-2" and settings.system_message is None
    assert get_template(settings.template).system_message.startswith("你是由上海人工智能实验室")
    assert (settings.image_size, settings.num_image_token) == (448, 256)
    assert (settings.dynamic_image_size, settings.use_thumbnail) == (True, True)
    assert (settings.min_dynamic_patch, settings.max_dynamic_patch) == (1, 12)
    assert settings.ps_version == "v2" and settings.llm_arch == "Qwen2ForCausalLM"
    text = native_config(real_config, image_token_id=IMG_CONTEXT_ID).text_config
    assert text.rope_parameters["rope_theta"] == 1_000_000.0
    assert (text.num_hidden_layers, text.vocab_size) == (24, 151655)


# ---------------------------------------------------------------------------- tying on a synthetic checkpoint


def _qwen2_checkpoint(tmp_path: Path, top_level_tie: bool | None, llm_tie: bool) -> tuple[Path, dict]:
    """The Qwen2 fixture (InternVL2-1B style: its lm_head and embed_tokens differ) with tie flags set."""
    folder = tmp_path / f"qwen2_{top_level_tie}_{llm_tie}"
    skip = shutil.ignore_patterns("images", "video", "expected.safetensors", "tiles.safetensors")
    shutil.copytree(FIXTURES / "internvl_chat_qwen2_tiny", folder, ignore=skip)
    config = json.loads((folder / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    if top_level_tie is not None:
        config["tie_word_embeddings"] = top_level_tie
    config["llm_config"]["tie_word_embeddings"] = llm_tie
    (folder / "config.json").write_text(json.dumps(config))
    return folder, config


def _reference_logits(folder: Path, config: dict, input_ids: torch.Tensor, head: str) -> torch.Tensor:
    """Logits of transformers' own Qwen2ForCausalLM on the stored LLM weights, with ``head`` as lm head."""
    stored = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    llm = {k[len("language_model."):]: v for k, v in stored.items() if k.startswith("language_model.")}
    assert not torch.equal(llm["lm_head.weight"], llm["model.embed_tokens.weight"])  # the case that matters
    llm["lm_head.weight"] = llm[head]
    keep = {"vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act"}
    kwargs = {k: v for k, v in config["llm_config"].items() if k in keep}
    cfg = Qwen2Config(**kwargs, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict(llm, strict=True)
    with torch.inference_mode():
        return model(input_ids=input_ids).logits[0]


@pytest.mark.parametrize(
    ("top_level_tie", "llm_tie", "head"),
    [
        (None, True, "model.embed_tokens.weight"),  # InternVL2-1B: top level absent, llm_config true
        (None, False, "model.embed_tokens.weight"),  # llm_config's flag is not consulted
        (True, False, "model.embed_tokens.weight"),
        (False, True, "lm_head.weight"),  # top level false: the stored head
    ],
)
def test_lm_head_follows_the_reference_tying(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            top_level_tie: bool | None, llm_tie: bool, head: str) -> None:
    folder, config = _qwen2_checkpoint(tmp_path, top_level_tie, llm_tie)
    with caplog.at_level(logging.WARNING, logger="chat.convert"):
        model = load_chat_model(folder, device="cpu", dtype=torch.float32)
    tied = head == "model.embed_tokens.weight"
    assert any("stored lm_head.weight differs" in r.getMessage() for r in caplog.records) == tied
    lm, emb = model.model.lm_head.weight, model.model.get_input_embeddings().weight
    assert (lm.data_ptr() == emb.data_ptr()) == tied
    input_ids = model.encode([model.build_prompt("Who are you?", None)])["input_ids"]
    with torch.inference_mode():
        ours = model.model(input_ids=input_ids).logits[0]
    torch.testing.assert_close(ours, _reference_logits(folder, config, input_ids, head),
                               atol=LOGIT_ATOL, rtol=LOGIT_RTOL)  # fmt: skip
