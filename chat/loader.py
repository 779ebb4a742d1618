"""``load_chat_model``: an InternVL-Chat folder (original or HF-native format) -> :class:`ChatModel`.

Original folders are converted at load time (:mod:`chat.convert`) into transformers' native
``InternVLForConditionalGeneration``; nothing from the folder is executed (no ``trust_remote_code``), weights
come from safetensors only (single file or sharded with ``model.safetensors.index.json``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase

from chat.convert import (
    ChatSettings,
    CheckpointError,
    chat_settings,
    convert_state_dict,
    is_original_format,
    native_config,
    tie_lm_head,
    use_pixel_shuffle_v1,
)
from chat.model import ChatModel
from retrieval.devices import attention_implementation, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
QUANT_MODES = ("8bit", "4bit")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder}: only pickle weights (*.bin/*.pt) found; convert them to safetensors"
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer without remote code (via :func:`chat.prompt.load_tokenizer` when present)."""
    try:
        from chat.prompt import load_tokenizer as load_prompt_tokenizer
    except ImportError:  # chat.prompt not available: plain AutoTokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    return load_prompt_tokenizer(folder)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return resolve_device(None)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on natively-bf16 CUDA, fp16 on older CUDA, fp32 elsewhere (``retrieval.devices``)."""
    return resolve_dtype(None, device)


def quantization_config(mode: str | None) -> Any:
    """``BitsAndBytesConfig`` for ``"8bit"`` / ``"4bit"`` (the optional ``quant`` extra), or None."""
    if mode is None:
        return None
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {QUANT_MODES}, got {mode!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{mode} loading needs bitsandbytes: pip install 'internvl-retrieval[quant]'")
    from transformers import BitsAndBytesConfig

    skip = ["vision_tower", "multi_modal_projector", "lm_head"]  # keep the ViT and heads in full precision
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip
    )


def default_device_map(device: torch.device, n_params: int, dtype: torch.dtype, quantized: bool) -> Any:
    """Where the weights go: None on CPU; on CUDA the one device, or ``"auto"`` (accelerate splits the
    model over the GPUs) when it does not fit on one of several GPUs."""
    if device.type != "cuda":
        if quantized:
            raise ValueError("8-bit / 4-bit loading (bitsandbytes) needs a CUDA device")
        return None
    need = n_params * (1 if quantized else torch.finfo(dtype).bits // 8)
    free, _ = torch.cuda.mem_get_info(device)
    if torch.cuda.device_count() > 1 and need > 0.85 * free:
        logger.info("model needs %.1f GiB > one GPU: splitting with device_map='auto'", need / 2**30)
        return "auto"
    return {"": str(device)}


def _check_loading_info(info: dict[str, Any], folder: Path) -> None:
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if info.get("error_msgs"):
        problems["error_msgs"] = list(info["error_msgs"])
    if any(problems.values()):
        detail = "; ".join(f"{k}: {v[:20]}{' ...' if len(v) > 20 else ''}" for k, v in problems.items() if v)
        raise CheckpointError(f"{folder}: weights do not match the model ({detail})")


def _settings_from_native(folder: Path, config: dict[str, Any]) -> ChatSettings:
    vision = config.get("vision_config", {})
    size = vision.get("image_size", 448)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    arch = (config.get("text_config", {}).get("architectures") or ["Qwen2ForCausalLM"])[0]
    return ChatSettings(
        template=config.get("template") or "internvl2_5",
        image_size=size,
        num_image_token=int(config.get("image_seq_length", 256)),
        dynamic_image_size=bool(pre.get("crop_to_patches", True)),
        use_thumbnail=True,
        min_dynamic_patch=int(pre.get("min_patches", 1)),
        max_dynamic_patch=int(pre.get("max_patches", 12)),
        ps_version="v2",
        llm_arch=arch,
    )


def load_chat_model(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantization: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    template: str | None = None,
) -> ChatModel:
    """Load an InternVL-Chat folder into a :class:`ChatModel` (native transformers classes, no remote code).

    Defaults: CUDA when available, bf16 there (fp16 without native bf16) and fp32 on CPU, flash-attn 2 where
    usable; ``dtype`` takes the names of :mod:`retrieval.devices` (``"bf16"``, ``"auto"``, ...).
    ``quantization`` ``"8bit"``/``"4bit"`` needs bitsandbytes and CUDA; ``device_map`` becomes ``"auto"``
    only when the model does not fit on one of several GPUs. ``template`` overrides the conversation
    template (HF-native folders carry none: ``internvl2_5`` is assumed).
    """
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a model folder)")
    config = json.loads(config_path.read_text())
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    attn = attn_implementation or attention_implementation(device, dtype)
    tokenizer = load_tokenizer(folder)
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{folder}: tokenizer has no {IMG_CONTEXT_TOKEN} token")
    common: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn, "output_loading_info": True}
    quant = quantization_config(quantization)
    if quant is not None:
        common["quantization_config"] = quant

    if is_original_format(config):
        settings = chat_settings(config, folder)
        state = convert_state_dict(read_safetensors(folder), config, dtype=dtype)
        state, tied = tie_lm_head(state, config)  # the reference InternVLChatModel's tying (4.37)
        n_params = sum(t.numel() for t in state.values())
        device_map = device_map or default_device_map(device, n_params, dtype, quant is not None)
        model, info = InternVLForConditionalGeneration.from_pretrained(
            None,
            config=native_config(config, image_token_id=image_token_id, tie_word_embeddings=tied),
            state_dict=state,
            device_map=device_map,
            **common,
        )
        del state
    elif config.get("model_type") == "internvl":
        settings = _settings_from_native(folder, config)
        if device_map is None and device.type == "cuda":
            device_map = {"": str(device)}
        model, info = InternVLForConditionalGeneration.from_pretrained(
            str(folder), device_map=device_map, **common
        )
    else:
        raise CheckpointError(
            f"{folder}: model_type {config.get('model_type')!r} is neither 'internvl_chat' (original) "
            "nor 'internvl' (HF-native)"
        )
    _check_loading_info(info, folder)
    if template is not None:
        settings = dataclasses.replace(settings, template=template)
    if settings.ps_version == "v1":
        use_pixel_shuffle_v1(model)
    _match_qk_norm_eps(model, config)
    if device_map is None:
        model.to(device)
    model.eval()
    logger.info(
        "loaded %s (%s, template %s) on %s as %s", folder, settings.llm_arch, settings.template, device, dtype
    )
    return ChatModel(
        model, tokenizer, settings, llm_config=config.get("llm_config") or config.get("text_config")
    )


def _match_qk_norm_eps(model: InternVLForConditionalGeneration, config: dict[str, Any]) -> None:
    """InternViT-6B's q/k RMSNorm uses ``layer_norm_eps``; the native class hard-codes 1e-6."""
    eps = (config.get("vision_config") or {}).get("layer_norm_eps")
    if eps is None:
        return
    for layer in model.model.vision_tower.encoder.layer:
        for norm in (layer.attention.q_norm, layer.attention.k_norm):
            if hasattr(norm, "variance_epsilon"):
                norm.variance_epsilon = float(eps)
