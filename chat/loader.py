"""``load_chat_model``: an InternVL-Chat folder (original or HF-native format) -> :class:`ChatModel`.

Original folders are converted at load time (:mod:`chat.convert`) into transformers' native
``InternVLForConditionalGeneration``; nothing from the folder is executed (no ``trust_remote_code``), weights
come from safetensors only (single file or sharded with ``model.safetensors.index.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
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
#: kept in full precision under 8/4-bit: everything but the language model's linears. transformers 5 matches
#: these from the start of a module's full name (or as its suffix), so the ``model.`` prefix is required.
QUANT_SKIP_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
#: bytes per parameter of the quantized modes (the device-map memory estimate)
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5}
#: ``load_chat_model("demo")`` resolves to this folder (built by ``scripts/train_demo_chat.py``)
DEMO_CHAT_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_ALIAS = "demo"


def safetensors_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or the shards listed in ``model.safetensors.index.json``."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder}: only pickle weights (*.bin/*.pt) found; convert them to safetensors"
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors file(s), read eagerly (the loader streams instead)."""
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        state.update(load_file(file))
    return state


def count_parameters(files: list[Path]) -> int:
    """Number of stored elements, from the safetensors headers only (nothing is read)."""
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
#: the converted names :func:`chat.convert.tie_lm_head` reads
_TIE_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger stored tensor (a q/k/v split) so that it does not
    keep the whole fused tensor alive."""
    if tensor.device.type != "meta" and tensor.untyped_storage().nbytes() > tensor.nbytes:
        return tensor.clone()
    return tensor


class LazyCheckpoint:
    """An original-format checkpoint converted tensor by tensor while transformers loads it.

    Only the safetensors headers are read up front (``safe_open``); each stored tensor is read and converted
    (:func:`chat.convert.convert_state_dict` on that one tensor) when the first of its converted parts is
    asked for, and its other parts (q/k/v splits) wait until taken. Peak host memory is therefore about one
    copy of the weights (the model's) plus one stored tensor, not the whole checkpoint plus its conversion.
    """

    def __init__(self, folder: Path, config: Mapping[str, Any], dtype: torch.dtype | None) -> None:
        self.config, self.dtype = config, dtype
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self._source: dict[str, str] = {}  # converted name -> stored name
        self._pending: dict[str, torch.Tensor] = {}  # converted parts read but not yet taken
        self._lock = threading.Lock()
        self.shapes: dict[str, torch.Tensor] = {}  # converted name -> meta tensor (shape, dtype)
        try:
            for file in safetensors_files(folder):
                handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
                for name in handle.keys():
                    self._handles[name] = handle
                    info = handle.get_slice(name)
                    meta = torch.empty(
                        info.get_shape(), dtype=_ST_DTYPES.get(info.get_dtype(), torch.float32), device="meta"
                    )
                    for key, part in convert_state_dict({name: meta}, config, dtype=dtype).items():
                        self.shapes[key], self._source[key] = part, name
        except BaseException:
            self._stack.close()
            raise

    @property
    def n_params(self) -> int:
        """Elements of the converted state dict."""
        return sum(t.numel() for t in self.shapes.values())

    def take(self, key: str) -> torch.Tensor:
        """The converted tensor ``key``, read now (once per stored tensor); the caller owns it."""
        with self._lock:
            if key not in self._pending:
                name = self._source[key]
                stored = self._handles[name].get_tensor(name)
                parts = convert_state_dict({name: stored}, self.config, dtype=self.dtype)
                for part_key, part in parts.items():
                    if part_key in self.shapes:
                        self._pending[part_key] = _owned(part)
                del parts
                del stored
            return self._pending.pop(key)

    def tie(self) -> bool:
        """Apply :func:`chat.convert.tie_lm_head` (it sees the embeddings and head; the rest as meta)."""
        probe = dict(self.shapes)
        for key in _TIE_KEYS:
            if key in probe:
                probe[key] = self.take(key)
        probe, tied = tie_lm_head(probe, self.config)
        for key in [k for k in self.shapes if k not in probe]:
            del self.shapes[key]
            self._source.pop(key, None)
        with self._lock:
            for key, tensor in probe.items():
                if tensor.device.type != "meta":
                    self._pending[key] = tensor
                    self.shapes[key] = tensor.to("meta")
        return tied

    def state_dict(self) -> dict[str, LazyTensor]:
        """Converted name -> :class:`LazyTensor`, for ``from_pretrained(state_dict=...)``."""
        return {key: LazyTensor(self, key, meta) for key, meta in self.shapes.items()}

    def close(self) -> None:
        """Drop untaken parts and close the files."""
        self._pending.clear()
        self._stack.close()


class LazyTensor:
    """Stands in for a safetensors slice in transformers' loader, which materialises it with ``[...]``."""

    __slots__ = ("_checkpoint", "_key", "_meta")

    def __init__(self, checkpoint: LazyCheckpoint, key: str, meta: torch.Tensor) -> None:
        self._checkpoint, self._key, self._meta = checkpoint, key, meta

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._checkpoint.take(self._key)[index]

    @property
    def shape(self) -> torch.Size:
        return self._meta.shape

    @property
    def dtype(self) -> torch.dtype:
        return self._meta.dtype

    def get_shape(self) -> list[int]:
        return list(self._meta.shape)

    def __len__(self) -> int:
        return self._meta.shape[0] if self._meta.dim() else 0


def resolve_chat_model_path(path: str | Path) -> Path:
    """``"demo"`` -> the bundled demo chat model folder (:data:`DEMO_CHAT_MODEL_DIR`); otherwise the path."""
    if str(path) == DEMO_ALIAS:
        if not (DEMO_CHAT_MODEL_DIR / "config.json").is_file():
            raise CheckpointError(
                f"the demo chat model is not built: {DEMO_CHAT_MODEL_DIR} has no config.json "
                "(python scripts/train_demo_chat.py --out chat/demo_model)"
            )
        return DEMO_CHAT_MODEL_DIR
    return Path(path)


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


def quantization_config(
    mode: str | None, dtype: torch.dtype | None = None, *, cpu_offload: bool = False
) -> Any:
    """``BitsAndBytesConfig`` for ``"8bit"`` / ``"4bit"`` (the optional ``quant`` extra), or None.

    Only the language model's linears are quantized (:data:`QUANT_SKIP_MODULES` stay in ``dtype``). 4-bit:
    NF4 with double quantization, computing in ``dtype`` (bf16 when not given). ``cpu_offload`` keeps
    modules a device map puts on the CPU or disk unquantized instead of refusing the map.
    """
    if mode is None:
        return None
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {QUANT_MODES}, got {mode!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{mode} loading needs bitsandbytes: pip install 'internvl-retrieval[quant]'")
    from transformers import BitsAndBytesConfig

    skip = list(QUANT_SKIP_MODULES)
    if mode == "8bit":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_enable_fp32_cpu_offload=cpu_offload
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=dtype or torch.bfloat16,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip,
        llm_int8_enable_fp32_cpu_offload=cpu_offload,
    )


def check_quantization_device(device: torch.device, quantization: str | None) -> None:
    """8/4-bit loading (bitsandbytes) is offered on CUDA only."""
    if quantization is not None and device.type != "cuda":
        raise ValueError(f"8-bit / 4-bit loading (bitsandbytes) needs a CUDA device, not {device}")


def _bytes_per_param(dtype: torch.dtype, quantized: bool | str | None) -> float:
    if isinstance(quantized, str):
        return QUANT_BYTES[quantized]
    return 1.0 if quantized else torch.finfo(dtype).bits / 8


def default_device_map(
    device: torch.device, n_params: int, dtype: torch.dtype, quantized: bool | str | None = None
) -> Any:
    """Where the weights go: None on CPU; on CUDA the one device, or ``"auto"`` (accelerate splits the
    model over ``device`` and the GPUs after it) when it does not fit there and more GPUs follow.

    ``quantized``: ``"8bit"`` (1 byte per parameter), ``"4bit"`` (0.5) or a bool (True: 8-bit).
    """
    if device.type != "cuda":
        if quantized:
            raise ValueError("8-bit / 4-bit loading (bitsandbytes) needs a CUDA device")
        return None
    need = n_params * _bytes_per_param(dtype, quantized)
    free, _ = torch.cuda.mem_get_info(device)
    gpus = torch.cuda.device_count() - (device.index or 0)
    if gpus > 1 and need > 0.85 * free:
        logger.info("model needs %.1f GiB > one GPU: splitting with device_map='auto'", need / 2**30)
        return "auto"
    return {"": str(device)}


def auto_max_memory(device: torch.device) -> dict[int | str, int] | None:
    """accelerate's budget for ``device_map="auto"`` on ``cuda:N``: free memory of GPUs N.. and the host's
    available memory (GPUs before N get nothing); None for ``cuda`` without an index or for the CPU."""
    if device.type != "cuda" or device.index is None:
        return None
    import psutil  # an accelerate dependency

    budget: dict[int | str, int] = {
        i: int(torch.cuda.mem_get_info(i)[0]) for i in range(device.index, torch.cuda.device_count())
    }
    budget["cpu"] = int(psutil.virtual_memory().available)
    return budget


def _offloads(device_map: Any) -> bool:
    if device_map == "auto" or (isinstance(device_map, str) and device_map.startswith("balanced")):
        return True
    return isinstance(device_map, dict) and any(str(v) in ("cpu", "disk") for v in device_map.values())


def placement(
    device: torch.device,
    n_params: int,
    dtype: torch.dtype,
    *,
    quantization: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for placement and quantization, the same for both folder formats:
    ``device_map`` (:func:`default_device_map` unless given), ``max_memory`` (given, or
    :func:`auto_max_memory` for ``"auto"`` on ``cuda:N``), ``offload_folder``, ``quantization_config``."""
    check_quantization_device(device, quantization)
    if device_map is None:
        device_map = default_device_map(device, n_params, dtype, quantization)
    if max_memory is None and device_map == "auto":
        max_memory = auto_max_memory(device)
    kwargs: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    quant = quantization_config(quantization, dtype, cpu_offload=_offloads(device_map))
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


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
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
) -> ChatModel:
    """Load an InternVL-Chat folder into a :class:`ChatModel` (native transformers classes, no remote code).

    Defaults: CUDA when available, bf16 there (fp16 without native bf16) and fp32 on CPU, flash-attn 2 where
    usable; ``dtype`` takes the names of :mod:`retrieval.devices` (``"bf16"``, ``"auto"``, ...).
    ``quantization`` ``"8bit"``/``"4bit"`` (language-model linears only) needs bitsandbytes and CUDA;
    ``device_map`` becomes ``"auto"`` only when the model does not fit on ``device`` and more GPUs follow
    it (both folder formats, :func:`placement`); ``max_memory`` and ``offload_folder`` go to accelerate
    (a map with ``"disk"`` entries needs ``offload_folder``). Original folders are converted tensor by
    tensor as they load (:class:`LazyCheckpoint`). ``template`` overrides the conversation template
    (HF-native folders carry none: ``internvl2_5`` is assumed). ``"demo"`` is the bundled demo model
    (:data:`DEMO_CHAT_MODEL_DIR`), loaded like any original-format folder.
    """
    folder = resolve_chat_model_path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a model folder)")
    config = json.loads(config_path.read_text())
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_quantization_device(device, quantization)
    attn = attn_implementation or attention_implementation(device, dtype)
    tokenizer = load_tokenizer(folder)
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{folder}: tokenizer has no {IMG_CONTEXT_TOKEN} token")
    common: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn, "output_loading_info": True}
    where: dict[str, Any] = {
        "quantization": quantization, "device_map": device_map, "max_memory": max_memory,
        "offload_folder": offload_folder,
    }  # fmt: skip

    if is_original_format(config):
        settings = chat_settings(config, folder)
        checkpoint = LazyCheckpoint(folder, config, dtype)  # converted as transformers reads it
        try:
            tied = checkpoint.tie()  # the reference InternVLChatModel's tying (4.37)
            loading = placement(device, checkpoint.n_params, dtype, **where)
            model, info = InternVLForConditionalGeneration.from_pretrained(
                None,
                config=native_config(config, image_token_id=image_token_id, tie_word_embeddings=tied),
                state_dict=checkpoint.state_dict(),
                **loading,
                **common,
            )
        finally:
            checkpoint.close()
    elif config.get("model_type") == "internvl":
        settings = _settings_from_native(folder, config)
        loading = placement(device, count_parameters(safetensors_files(folder)), dtype, **where)
        model, info = InternVLForConditionalGeneration.from_pretrained(str(folder), **loading, **common)
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
    if loading["device_map"] is None:
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
