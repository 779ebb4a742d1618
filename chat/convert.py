"""Original InternVL-Chat checkpoints -> transformers' native ``InternVLForConditionalGeneration``.

Original folders (``model_type: "internvl_chat"``, the ``trust_remote_code`` layout of InternVL-Chat-V1-2,
V1-5, Mini-InternVL and InternVL2/2.5) hold an InternViT (``vision_model.*``), the ``mlp1`` projector and
an LLM (``language_model.*``: LLaMA, Qwen2, Phi-3 or InternLM2). Config and weight names are mapped
here, once at load time, so the native classes run them without any remote code:

* InternViT: fused ``attn.qkv`` split into ``q/k/v_proj``, ``ls1/ls2`` -> ``lambda_1/lambda_2``,
  ``norm1/norm2`` -> ``layernorm_before/after``, ``attn.proj`` -> ``projection_layer``;
* ``mlp1.{0,1,3}`` -> ``multi_modal_projector.{layer_norm,linear_1,linear_2}``;
* InternLM2: fused ``wqkv`` (grouped per key/value head) -> LLaMA ``q/k/v_proj`` and the other renames;
* LLaMA / Qwen2 / Phi-3: re-prefixed only (``language_model.model.`` -> ``model.language_model.``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig, LlamaConfig, PretrainedConfig

logger = logging.getLogger(__name__)

#: LLM architectures (``llm_config.architectures[0]``) this converter knows
SUPPORTED_LLMS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "InternLM2ForCausalLM")

# fmt: off
#: config keys that describe the original class or legacy generation defaults, not the architecture
_DROP_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
    "transformers_version", "attn_implementation", "use_flash_attn", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "chunk_size_feed_forward",
})
#: defaults of the reference ``InternVisionConfig`` (InternViT-6B) for keys a config.json may omit
VISION_DEFAULTS: dict[str, Any] = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6,
}
#: defaults of the reference ``InternVLChatConfig``
CHAT_DEFAULTS: dict[str, Any] = {
    "select_layer": -1, "force_image_size": None, "downsample_ratio": 0.5, "dynamic_image_size": False,
    "use_thumbnail": False, "ps_version": "v1", "min_dynamic_patch": 1, "max_dynamic_patch": 6,
}
# fmt: on


class CheckpointError(ValueError):
    """The checkpoint folder cannot be converted (unknown family, missing or unexpected weights...)."""


@dataclass(frozen=True)
class ChatSettings:
    """What the chat layer needs besides the model: template, tiling and image-token facts."""

    template: str
    image_size: int  # tile side in pixels (force_image_size)
    num_image_token: int  # LLM tokens per tile after pixel shuffle
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    ps_version: str = "v2"
    llm_arch: str = "LlamaForCausalLM"
    #: the checkpoint's ``system_message`` (config.json); None: the template's default
    system_message: str | None = None
    #: folder whose ``preprocessor_config.json`` preprocesses whole images (non-tiling checkpoints only)
    image_processor: str | None = None


def is_original_format(config: Mapping[str, Any]) -> bool:
    """True for the original ``InternVLChatModel`` layout (``model_type: internvl_chat``)."""
    return config.get("model_type") == "internvl_chat" or "llm_config" in config


def _clean(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _DROP_KEYS}


def llm_arch(config: Mapping[str, Any]) -> str:
    """The original LLM architecture name, validated."""
    llm = config.get("llm_config") or {}
    archs = llm.get("architectures") or []
    arch = (
        archs[0]
        if archs
        else {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "phi3": "Phi3ForCausalLM",
            "internlm2": "InternLM2ForCausalLM",
        }.get(llm.get("model_type", ""), "")
    )
    if arch not in SUPPORTED_LLMS:
        raise CheckpointError(
            f"unsupported LLM architecture {arch!r}; supported: {', '.join(SUPPORTED_LLMS)}"
        )
    return arch


def text_config(config: Mapping[str, Any], *, tie_word_embeddings: bool = False) -> PretrainedConfig:
    """``llm_config`` -> a native transformers text config (InternLM2 becomes a LLaMA config).

    ``tie_word_embeddings`` is decided by :func:`tie_lm_head` (the reference's tying), not by
    ``llm_config``'s own flag, which the reference never applies to a loaded checkpoint.
    """
    arch = llm_arch(config)
    llm = _clean(config["llm_config"])
    llm["tie_word_embeddings"] = tie_word_embeddings
    if arch == "InternLM2ForCausalLM":
        llm["attention_bias"] = bool(llm.pop("bias", False))
        llm["mlp_bias"] = False
        return LlamaConfig(**llm)
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Phi3ForCausalLM": "phi3"}[arch]
    if model_type == "phi3":
        llm["rope_scaling"] = _phi3_rope_scaling(llm)
    return AutoConfig.for_model(model_type, **llm)


def _phi3_rope_scaling(llm: Mapping[str, Any]) -> Any:
    """Phi-3's ``su`` / ``yarn`` scaling -> transformers' ``longrope`` (same per-frequency factors).

    They differ only in the cos/sin scale: su ``sqrt(1 + ln s / ln L0)`` (longrope's default), yarn
    ``0.1 ln s + 1`` (the reference ``Phi3YarnScaledRotaryEmbedding``), s = max / original max positions.
    """
    scaling = llm.get("rope_scaling")
    if not isinstance(scaling, dict) or scaling.get("type") not in ("su", "yarn", "longrope"):
        return scaling
    out = {**scaling, "type": "longrope"}
    if scaling["type"] == "yarn":
        original = llm.get("original_max_position_embeddings") or llm["max_position_embeddings"]
        scale = llm["max_position_embeddings"] / original
        out["attention_factor"] = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    return out


def vision_config(config: Mapping[str, Any]) -> InternVLVisionConfig:
    """InternViT ``vision_config`` -> ``InternVLVisionConfig`` (300M and 6B variants)."""
    vc = {**VISION_DEFAULTS, **config["vision_config"]}
    image_size = config.get("force_image_size") or vc["image_size"]
    return InternVLVisionConfig(
        hidden_size=vc["hidden_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"],
        hidden_act=vc["hidden_act"],
        layer_norm_eps=vc["layer_norm_eps"],
        norm_type=vc["norm_type"],  # 300M: layer_norm, 6B: rms_norm
        attention_bias=bool(vc["qkv_bias"]),  # 6B: no qkv bias
        use_qk_norm=bool(vc["qk_normalization"]),  # 6B: RMSNorm on q and k (over all heads)
        image_size=image_size,
        patch_size=vc["patch_size"],
        num_channels=vc["num_channels"],
        use_mean_pooling=True,  # no final vision norm in InternViT
        use_mask_token=False,
        use_absolute_position_embeddings=True,
    )


def chat_settings(config: Mapping[str, Any], folder: str | Path | None = None) -> ChatSettings:
    """Template, system message, tiling and image-token facts of an original-format config.

    ``system_message`` is the config's when it has one (the reference ``InternVLChatModel.__init__``:
    ``if hasattr(config, 'system_message')``), else None (the template's own). With ``folder``, a
    non-tiling checkpoint's ``preprocessor_config.json`` there is recorded as its image processor.
    """
    vc = {**VISION_DEFAULTS, **config["vision_config"]}
    cfg = {**CHAT_DEFAULTS, **config}
    image_size = int(cfg["force_image_size"] or vc["image_size"])
    ratio = float(cfg["downsample_ratio"])
    if cfg["ps_version"] not in ("v1", "v2"):
        raise CheckpointError(f"unknown ps_version {cfg['ps_version']!r} (expected 'v1' or 'v2')")
    if not cfg.get("template"):
        raise CheckpointError("config.json has no 'template' (the conversation template, e.g. 'Hermes-2')")
    system_message = config.get("system_message")
    if system_message is not None and not isinstance(system_message, str):
        raise CheckpointError(f"system_message must be a string, got {type(system_message).__name__}")
    dynamic = bool(cfg["dynamic_image_size"])
    processor = None
    if folder is not None and not dynamic and (Path(folder) / "preprocessor_config.json").is_file():
        processor = str(folder)
    return ChatSettings(
        template=cfg["template"],
        image_size=image_size,
        num_image_token=int((image_size // int(vc["patch_size"])) ** 2 * ratio**2),
        dynamic_image_size=dynamic,
        use_thumbnail=bool(cfg["use_thumbnail"]),
        min_dynamic_patch=int(cfg["min_dynamic_patch"]),
        max_dynamic_patch=int(cfg["max_dynamic_patch"]),
        ps_version=cfg["ps_version"],
        llm_arch=llm_arch(config),
        system_message=system_message,
        image_processor=processor,
    )


def native_config(
    config: Mapping[str, Any], *, image_token_id: int, tie_word_embeddings: bool = False
) -> InternVLConfig:
    """Original ``InternVLChatConfig`` dict -> native ``InternVLConfig``."""
    settings = chat_settings(config)
    select_layer = int(config.get("select_layer", CHAT_DEFAULTS["select_layer"]))
    out = InternVLConfig(
        vision_config=vision_config(config),
        text_config=text_config(config, tie_word_embeddings=tie_word_embeddings),
        image_token_id=image_token_id,
        image_seq_length=settings.num_image_token,
        downsample_ratio=float(config.get("downsample_ratio", 0.5)),
        projector_hidden_act="gelu",
        vision_feature_layer=select_layer,
        vision_feature_select_strategy="default",  # drop CLS
        tie_word_embeddings=tie_word_embeddings,
    )
    return out


# ---------------------------------------------------------------------------- weights

_VIT = "model.vision_tower."
_LAYER = r"^vision_model\.encoder\.layers\.(\d+)\."
_VIT_RENAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", _VIT + "embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", _VIT + "embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", _VIT + "embeddings.patch_embeddings.projection."),
    (_LAYER + r"attn\.proj\.", _VIT + r"encoder.layer.\1.attention.projection_layer."),
    (_LAYER + r"attn\.(q_norm|k_norm)\.", _VIT + r"encoder.layer.\1.attention.\2."),
    (_LAYER + r"mlp\.", _VIT + r"encoder.layer.\1.mlp."),
    (_LAYER + r"norm1\.", _VIT + r"encoder.layer.\1.layernorm_before."),
    (_LAYER + r"norm2\.", _VIT + r"encoder.layer.\1.layernorm_after."),
    (_LAYER + r"ls1$", _VIT + r"encoder.layer.\1.lambda_1"),
    (_LAYER + r"ls2$", _VIT + r"encoder.layer.\1.lambda_2"),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
]

_INTERNLM2_RENAMES = [
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"^output\.", "lm_head."),
]

_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_WQKV = re.compile(r"^model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")


def split_internlm2_wqkv(
    wqkv: torch.Tensor, *, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2 fused ``wqkv`` -> LLaMA ``(q_proj, k_proj, v_proj)`` (weight or bias).

    Rows are grouped per key/value head: ``g = num_heads / num_kv_heads`` query heads, then that group's key
    head, then its value head, ``head_dim`` rows each. Query head ``h * g + j`` pairs with kv head ``h``,
    which is what LLaMA's ``repeat_kv`` expects, and InternLM2 already uses LLaMA's ``rotate_half`` RoPE.
    """
    groups = num_heads // num_kv_heads
    rows = wqkv.shape[0]
    head_dim = rows // (num_kv_heads * (groups + 2))
    if head_dim * num_kv_heads * (groups + 2) != rows:
        raise CheckpointError(f"wqkv has {rows} rows, not a multiple of kv heads {num_kv_heads} x (g+2)")
    x = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *wqkv.shape[1:])  # [n_kv, g+2, d, (hidden)]
    q = x[:, :groups].reshape(num_heads * head_dim, *wqkv.shape[1:])
    k = x[:, groups].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    v = x[:, groups + 1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    return q, k, v


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Original ``InternVLChatModel`` state dict -> native ``InternVLForConditionalGeneration`` names.

    Unknown keys are kept under their original name so that the loader reports them as unexpected.
    """
    arch = llm_arch(config)
    llm = config["llm_config"]
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value

    for name, tensor in state_dict.items():
        if m := _QKV.match(name):
            layer, kind = m.groups()
            prefix = f"model.vision_tower.encoder.layer.{layer}.attention"
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                put(f"{prefix}.{proj}.{kind}", part.contiguous())
        elif name.startswith(("vision_model.", "mlp1.")):
            put(_rename(name, _VIT_RENAMES), tensor)
        elif name.startswith("language_model."):
            inner = name[len("language_model.") :]
            if arch == "InternLM2ForCausalLM":
                if m := _WQKV.match(inner):
                    layer, kind = m.groups()
                    q, k, v = split_internlm2_wqkv(
                        tensor, num_heads=llm["num_attention_heads"], num_kv_heads=llm["num_key_value_heads"]
                    )
                    for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                        put(f"model.language_model.layers.{layer}.self_attn.{proj}.{kind}", part.contiguous())
                    continue
                inner = _rename(inner, _INTERNLM2_RENAMES)
            if inner.startswith("model."):
                put("model.language_model." + inner[len("model.") :], tensor)
            elif inner.startswith("lm_head."):
                put(inner, tensor)
            else:
                put(name, tensor)
        else:
            put(name, tensor)
    return out


# ---------------------------------------------------------------------------- lm head tying

_EMBED = "model.language_model.embed_tokens.weight"
_HEAD = "lm_head.weight"


def reference_ties_head(config: Mapping[str, Any]) -> bool:
    """Whether the reference ``InternVLChatModel`` ties its lm head to the input embeddings.

    transformers 4.37 ``from_pretrained`` ties only at the top level: ``tie_weights()`` reads the
    ``InternVLChatConfig``'s ``tie_word_embeddings`` (absent from config.json: the ``PretrainedConfig``
    default, True) and ties ``get_output_embeddings()`` to ``get_input_embeddings()``, which the reference
    class forwards to its ``language_model``. The nested LLM's own ``tie_weights`` never runs during
    loading (weights are not initialised), so ``llm_config.tie_word_embeddings`` is not consulted.
    """
    return bool(config.get("tie_word_embeddings", True))


def tie_lm_head(
    state: dict[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], bool]:
    """Apply the reference's tying to a converted state dict: ``(state, tied)``.

    * The reference ties (:func:`reference_ties_head`) and the checkpoint stores both tensors: the head is
      the stored ``embed_tokens`` and the stored ``lm_head`` is dropped (logged when it differs). This is
      what the reference loader ``internvl.model.load_model_and_tokenizer`` computes
      (``from_pretrained(..., low_cpu_mem_usage=True)``: the weights replace the meta parameters, then
      ``tie_weights()`` points the head at the embeddings), as does any ``device_map`` load.
    * The checkpoint has no ``lm_head``: tied when the reference ties or ``llm_config`` says so (a
      checkpoint saved with a shared head), else the head is reported missing.
    * Otherwise the stored tensors are used as stored.
    """
    llm_ties = bool((config.get("llm_config") or {}).get("tie_word_embeddings"))
    if _HEAD not in state:
        return state, reference_ties_head(config) or llm_ties
    if not reference_ties_head(config) or _EMBED not in state:
        return state, False
    head = state.pop(_HEAD)
    embed = state[_EMBED]
    if head.shape != embed.shape or (not head.is_meta and not torch.equal(head, embed)):
        logger.warning(
            "config.json ties the lm head to the input embeddings (top-level tie_word_embeddings %s): the "
            "stored lm_head.weight differs from embed_tokens and is not used, as in the reference "
            "InternVLChatModel",
            "absent (default true)" if "tie_word_embeddings" not in config else "true",
        )
    return state, True


# ---------------------------------------------------------------------------- pixel shuffle v1

_PS_V1_WARNED = False
PS_V1_WARNING = (
    "In ps_version 'v1', the height and width have not been swapped back, "
    "which results in a transposed image."
)


def pixel_shuffle_v1(vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """The reference ``InternVLChatModel.pixel_shuffle`` with ``ps_version == 'v1'``.

    ``[n, w, h, c] -> [n, h*s, w*s, c/s^2]`` without the final height/width swap of v2. The reference's
    warning is logged once per process, not on every call.
    """
    global _PS_V1_WARNED
    if not _PS_V1_WARNED:
        _PS_V1_WARNED = True
        logger.warning(PS_V1_WARNING)
    n, w, h, c = vision_features.size()
    x = vision_features.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))


def use_pixel_shuffle_v1(model: torch.nn.Module) -> None:
    """Make a native ``InternVLForConditionalGeneration`` shuffle pixels as ``ps_version: v1``."""
    model.model.pixel_shuffle = pixel_shuffle_v1


# ---------------------------------------------------------------------------- checkpoint layout

_NV = r"^model\.vision_tower\."
_NL = _NV + r"encoder\.layer\.(\d+)\."
_OL = r"vision_model.encoder.layers.\1."
_NATIVE_TO_ORIGINAL = [
    (_NV + r"embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (_NV + r"embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
    (_NV + r"embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
    (_NL + r"attention\.projection_layer\.", _OL + "attn.proj."),
    (_NL + r"attention\.(q_norm|k_norm)\.", _OL + r"attn.\2."),
    (_NL + r"mlp\.", _OL + "mlp."),
    (_NL + r"layernorm_before\.", _OL + "norm1."),
    (_NL + r"layernorm_after\.", _OL + "norm2."),
    (_NL + r"lambda_1$", _OL + "ls1"),
    (_NL + r"lambda_2$", _OL + "ls2"),
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
]
_INTERNLM2_TO_ORIGINAL = [
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"^model\.embed_tokens\.", "model.tok_embeddings."),
    (r"^lm_head\.", "output."),
]
_NATIVE_QKV = re.compile(_NL + r"attention\.[qkv]_proj\.(weight|bias)$")
_NATIVE_LLM_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$")


def checkpoint_layout(config: Mapping[str, Any], *, image_token_id: int = 0) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the original-format checkpoint that the converter expects for ``config``.

    Built from the native model on the ``meta`` device (no memory) with an untied head, so the stored
    ``language_model.lm_head.weight`` (or InternLM2's ``output.weight``) is included; the fused InternViT
    ``qkv`` and InternLM2 ``wqkv`` tensors appear as stored.
    """
    from transformers import InternVLForConditionalGeneration

    arch = llm_arch(config)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native_config(config, image_token_id=image_token_id))
    layout: dict[str, tuple[int, ...]] = {}

    def fuse(name: str, shape: tuple[int, ...]) -> None:
        if name in layout:
            layout[name] = (layout[name][0] + shape[0], *shape[1:])
        else:
            layout[name] = shape

    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if m := _NATIVE_QKV.match(name):
            fuse(f"vision_model.encoder.layers.{m[1]}.attn.qkv.{m[2]}", shape)
            continue
        if name.startswith("model.vision_tower.") or name.startswith("model.multi_modal_projector."):
            layout[_rename(name, _NATIVE_TO_ORIGINAL)] = shape
            continue
        inner = name
        if name.startswith("model.language_model."):
            inner = "model." + name[len("model.language_model.") :]
        if arch == "InternLM2ForCausalLM":
            if m := _NATIVE_LLM_QKV.match(inner):
                fuse(f"language_model.model.layers.{m[1]}.attention.wqkv.{m[2]}", shape)
                continue
            inner = _rename(inner, _INTERNLM2_TO_ORIGINAL)
        layout["language_model." + inner] = shape
    return layout


def original_state_dict(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Native ``InternVLForConditionalGeneration`` state dict -> original ``InternVLChatModel`` names (the
    inverse of :func:`convert_state_dict`, for LLaMA / Qwen2 / Phi-3 LLMs): InternViT ``q/k/v_proj`` fused
    back into ``attn.qkv``; ``lm_head.weight`` is left out when ``config`` ties it (it is the embedding)."""
    arch = llm_arch(config)
    if arch == "InternLM2ForCausalLM":
        raise CheckpointError("writing InternLM2 checkpoints (fused wqkv) is not supported")
    tied = reference_ties_head(config)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if m := _NATIVE_QKV.match(name):
            proj = name.split(".")[-2]
            qkv.setdefault(f"vision_model.encoder.layers.{m[1]}.attn.qkv.{m[2]}", {})[proj] = tensor
        elif name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            out[_rename(name, _NATIVE_TO_ORIGINAL)] = tensor
        elif name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model.") :]] = tensor
        elif name == _HEAD:
            if not tied:
                out["language_model.lm_head.weight"] = tensor
        else:
            raise CheckpointError(f"unexpected native weight {name!r}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out
