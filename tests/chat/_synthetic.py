"""Tiny ORIGINAL-format InternVL-Chat checkpoints built in seconds, for formats the golden fixtures lack.

``build_checkpoint(spec, folder)`` writes ``config.json`` (the keys of the golden fixture's config, with the
vision / LLM parts replaced), ``model.safetensors`` (bf16, the reference's exact parameter names, random
non-trivial values: norm weights != 1, biases != 0, ``ls1``/``ls2`` in [0.2, 1]) and tokenizer files (the
golden fixture's LLaMA sentencepiece model with the family's added tokens).

Covered: a Phi-3 LLM (Mini-InternVL-Chat-4B-V1-5: fused ``qkv_proj`` / ``gate_up_proj``, ``su`` rope scaling,
template ``phi3-chat``, Phi-3's added tokens) and an InternViT-6B-style vision tower (InternVL-Chat-V1-5 /
V1-2-Plus: ``rms_norm``, ``qk_normalization``, no qkv bias, ``select_layer``, ``ps_version`` v1/v2).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "internvl_chat_tiny"
GOLDEN_INTERNLM2 = GOLDEN.parent / "internvl_chat_internlm2_tiny"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

INTERNVL_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
# Phi-3-mini's added tokens 32000..32010 (rstrip as in microsoft/Phi-3-mini-128k-instruct's tokenizer_config)
PHI3_TOKENS = [
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
]
HERMES_TOKENS = [("<|endoftext|>", False), ("<|im_start|>", False), ("<|im_end|>", False)]


@dataclass(frozen=True)
class Spec:
    """What to build. ``vision``: ``"300m"`` (layer_norm, qkv bias) or ``"6b"`` (rms_norm, qk-norm)."""

    name: str
    llm: str  # "phi3" | "llama" | "internlm2"
    template: str
    vision: str = "300m"
    vit_layers: int = 2
    select_layer: int = -1
    ps_version: str = "v2"
    seed: int = 0
    # Phi-3 rope: "su" with short/long factors as Phi-3-mini-128k (None: plain rope)
    rope_type: str | None = "su"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 128
    sliding_window: int | None = None
    phi3_tokens_in_special_map: bool = False
    internlm2_bias: bool = True  # InternLM2's ``bias`` (q/k/v/o biases); the golden fixture has False
    llm_extra: dict[str, Any] = field(default_factory=dict)

    # sizes
    vit_hidden: int = 32
    vit_heads: int = 2
    vit_mlp: int = 64
    image_size: int = 56
    patch: int = 14
    llm_hidden: int = 32
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_mlp: int = 48
    llm_layers: int = 2


def added_tokens(spec: Spec) -> list[tuple[str, bool]]:
    """(content, rstrip) of the added tokens from id 32000 on, in order."""
    if spec.llm == "internlm2":  # the InternLM2 golden fixture's tokenizer, as is
        decoder = json.loads((GOLDEN_INTERNLM2 / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        ids = sorted(int(i) for i in decoder if int(i) >= 32000)
        return [(decoder[str(i)]["content"], bool(decoder[str(i)]["rstrip"])) for i in ids]
    family = PHI3_TOKENS if spec.llm == "phi3" else HERMES_TOKENS
    return [*family, *[(t, False) for t in INTERNVL_TOKENS]]


def special_map_tokens(spec: Spec) -> list[str]:
    """``additional_special_tokens`` of the tokenizer."""
    if spec.llm == "internlm2":
        cfg = json.loads((GOLDEN_INTERNLM2 / "tokenizer_config.json").read_text())
        return list(cfg["additional_special_tokens"])
    if spec.llm == "phi3":
        phi3 = [t for t, _ in PHI3_TOKENS[1:]] if spec.phi3_tokens_in_special_map else []
        return [*phi3, *INTERNVL_TOKENS]
    return [t for t, _ in HERMES_TOKENS] + INTERNVL_TOKENS


def _write_tokenizer(spec: Spec, folder: Path) -> int:
    if spec.llm == "internlm2":
        for name in TOKENIZER_FILES:
            shutil.copyfile(GOLDEN_INTERNLM2 / name, folder / name)
        return 32000 + len(added_tokens(spec))
    shutil.copyfile(GOLDEN / "tokenizer.model", folder / "tokenizer.model")
    cfg = json.loads((GOLDEN / "tokenizer_config.json").read_text())
    tokens = added_tokens(spec)
    decoder = {str(i): dict(cfg["added_tokens_decoder"][str(i)]) for i in (0, 1, 2)}
    for i, (content, rstrip) in enumerate(tokens):
        decoder[str(32000 + i)] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": rstrip,
            "single_word": False,
            "special": True,
        }
    extra = special_map_tokens(spec)
    cfg.update(added_tokens_decoder=decoder, additional_special_tokens=extra)
    if spec.llm == "phi3":  # Phi-3-mini: BOS added, eos = pad = <|endoftext|>
        cfg.update(add_bos_token=True, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        cfg.pop("spaces_between_special_tokens", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    smap = json.loads((GOLDEN / "special_tokens_map.json").read_text())
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    smap["additional_special_tokens"] = [{"content": t, **entry} for t in extra]
    if spec.llm == "phi3":
        smap["eos_token"] = {"content": "<|endoftext|>", **entry}
        smap["pad_token"] = "<|endoftext|>"
    (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({t: 32000 + i for i, (t, _) in enumerate(tokens)}))
    return 32000 + len(tokens)


def _llm_config(spec: Spec, vocab: int, golden_llm: dict[str, Any]) -> dict[str, Any]:
    if spec.llm == "internlm2":
        golden_llm = json.loads((GOLDEN_INTERNLM2 / "config.json").read_text())["llm_config"]
    llm = copy.deepcopy(golden_llm)
    llm.update(
        vocab_size=vocab,
        hidden_size=spec.llm_hidden,
        intermediate_size=spec.llm_mlp,
        num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads,
        num_hidden_layers=spec.llm_layers,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if spec.llm == "phi3":
        head_dim = spec.llm_hidden // spec.llm_heads
        gen = torch.Generator().manual_seed(spec.seed + 7)
        short = (1.0 + 2.0 * torch.rand(head_dim // 2, generator=gen)).tolist()
        long = (2.0 + 6.0 * torch.rand(head_dim // 2, generator=gen)).tolist()
        for key in ("attention_bias", "mlp_bias", "pretraining_tp", "head_dim"):
            llm.pop(key, None)
        llm.update(
            architectures=["Phi3ForCausalLM"],
            model_type="phi3",
            _name_or_path="microsoft/Phi-3-mini-128k-instruct",
            auto_map={
                "AutoConfig": "configuration_phi3.Phi3Config",
                "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
            },
            bos_token_id=1,
            eos_token_id=32000,
            pad_token_id=32000,
            hidden_act="silu",
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            attention_dropout=0.0,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=spec.max_position_embeddings,
            original_max_position_embeddings=spec.original_max_position_embeddings,
            rope_scaling=None
            if spec.rope_type is None
            else {"type": spec.rope_type, "short_factor": short, "long_factor": long},
            sliding_window=spec.sliding_window,
        )
    elif spec.llm == "internlm2":
        llm.update(bias=spec.internlm2_bias, attn_implementation="eager")
    else:
        llm.update(eos_token_id=32002, rope_theta=10000.0)
    llm.update(spec.llm_extra)
    return llm


def _vision_config(spec: Spec, golden_vit: dict[str, Any]) -> dict[str, Any]:
    vit = copy.deepcopy(golden_vit)
    six_b = spec.vision == "6b"
    vit.update(
        hidden_size=spec.vit_hidden,
        num_attention_heads=spec.vit_heads,
        intermediate_size=spec.vit_mlp,
        num_hidden_layers=spec.vit_layers,
        image_size=spec.image_size,
        patch_size=spec.patch,
        norm_type="rms_norm" if six_b else "layer_norm",
        qk_normalization=six_b,
        qkv_bias=not six_b,
        initializer_factor=0.1 if six_b else 1.0,
    )
    return vit


def vision_param_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Original InternViT + mlp1 parameter names and shapes (modeling_intern_vit.py / InternVLChatModel)."""
    c, m, n = spec.vit_hidden, spec.vit_mlp, (spec.image_size // spec.patch) ** 2
    six_b = spec.vision == "6b"
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, spec.patch, spec.patch),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, n + 1, c),
    }
    for i in range(spec.vit_layers):
        p = f"vision_model.encoder.layers.{i}."
        shapes[p + "attn.qkv.weight"] = (3 * c, c)
        if not six_b:
            shapes[p + "attn.qkv.bias"] = (3 * c,)
        else:
            shapes[p + "attn.q_norm.weight"] = (c,)
            shapes[p + "attn.k_norm.weight"] = (c,)
        shapes.update(
            {
                p + "attn.proj.weight": (c, c),
                p + "attn.proj.bias": (c,),
                p + "mlp.fc1.weight": (m, c),
                p + "mlp.fc1.bias": (m,),
                p + "mlp.fc2.weight": (c, m),
                p + "mlp.fc2.bias": (c,),
                p + "norm1.weight": (c,),
                p + "norm2.weight": (c,),
                p + "ls1": (c,),
                p + "ls2": (c,),
            }
        )
        if not six_b:
            shapes[p + "norm1.bias"] = (c,)
            shapes[p + "norm2.bias"] = (c,)
    cin = c * 4  # downsample_ratio 0.5 -> 4 patches per token
    shapes.update(
        {
            "mlp1.0.weight": (cin,),
            "mlp1.0.bias": (cin,),
            "mlp1.1.weight": (spec.llm_hidden, cin),
            "mlp1.1.bias": (spec.llm_hidden,),
            "mlp1.3.weight": (spec.llm_hidden, spec.llm_hidden),
            "mlp1.3.bias": (spec.llm_hidden,),
        }
    )
    return shapes


def internlm2_param_shapes(spec: Spec, vocab: int) -> dict[str, tuple[int, ...]]:
    """InternLM2ForCausalLM names: fused ``wqkv`` (grouped per kv head), ``wo``, ``w1/w3/w2``, ``output``."""
    h, d, i = spec.llm_hidden, spec.llm_hidden // spec.llm_heads, spec.llm_mlp
    rows = spec.llm_kv_heads * (spec.llm_heads // spec.llm_kv_heads + 2) * d
    shapes = {
        "language_model.model.tok_embeddings.weight": (vocab, h),
        "language_model.model.norm.weight": (h,),
        "language_model.output.weight": (vocab, h),
    }
    for n in range(spec.llm_layers):
        p = f"language_model.model.layers.{n}."
        shapes.update(
            {
                p + "attention.wqkv.weight": (rows, h),
                p + "attention.wo.weight": (h, spec.llm_heads * d),
                p + "feed_forward.w1.weight": (i, h),
                p + "feed_forward.w3.weight": (i, h),
                p + "feed_forward.w2.weight": (h, i),
                p + "attention_norm.weight": (h,),
                p + "ffn_norm.weight": (h,),
            }
        )
        if spec.internlm2_bias:
            shapes[p + "attention.wqkv.bias"] = (rows,)
            shapes[p + "attention.wo.bias"] = (h,)
    return shapes


def llm_param_shapes(spec: Spec, vocab: int) -> dict[str, tuple[int, ...]]:
    """Original LLM parameter names: Phi-3 (fused qkv_proj / gate_up_proj), LLaMA or InternLM2."""
    if spec.llm == "internlm2":
        return internlm2_param_shapes(spec, vocab)
    h, d, i = spec.llm_hidden, spec.llm_hidden // spec.llm_heads, spec.llm_mlp
    q, kv = spec.llm_heads * d, spec.llm_kv_heads * d
    shapes = {
        "language_model.model.embed_tokens.weight": (vocab, h),
        "language_model.model.norm.weight": (h,),
        "language_model.lm_head.weight": (vocab, h),
    }
    for n in range(spec.llm_layers):
        p = f"language_model.model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
        if spec.llm == "phi3":
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * i, h)
        else:
            shapes.update(
                {
                    p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                }
            )
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Non-trivial random values, rounded to bf16 (what real checkpoints store)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(("ls1", "ls2")):
            t = 0.2 + 0.8 * torch.rand(shape, generator=gen)
        elif "norm" in name.split(".")[-2] or name.startswith("mlp1.0") or "layernorm" in name:
            t = (
                (1.0 + 0.3 * torch.randn(shape, generator=gen))
                if name.endswith("weight")
                else 0.2 * torch.randn(shape, generator=gen)
            )
        elif name.endswith("bias"):
            t = 0.2 * torch.randn(shape, generator=gen)
        elif name.endswith(("class_embedding", "position_embedding")):
            t = 0.5 * torch.randn(shape, generator=gen)
        elif name.endswith(("embed_tokens.weight", "tok_embeddings.weight")):
            t = torch.randn(shape, generator=gen)
        elif name.endswith(("lm_head.weight", "language_model.output.weight")):
            t = 3.0 * torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        else:  # linear / conv weights: fan-in scaled
            t = 1.5 * torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        out[name] = t.to(torch.bfloat16)
    return out


def write_checkpoint(spec: Spec, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config + tokenizer + random weights (not yet written); returns (config, state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(spec, folder)
    config = json.loads((GOLDEN / "config.json").read_text())
    config.update(
        template=spec.template,
        select_layer=spec.select_layer,
        ps_version=spec.ps_version,
        force_image_size=spec.image_size,
        downsample_ratio=0.5,
        max_dynamic_patch=6,
        llm_config=_llm_config(spec, vocab, config["llm_config"]),
        vision_config=_vision_config(spec, config["vision_config"]),
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {**vision_param_shapes(spec), **llm_param_shapes(spec, vocab)}
    return config, random_weights(shapes, spec.seed)


def save_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    """``model.safetensors`` (bf16)."""
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
