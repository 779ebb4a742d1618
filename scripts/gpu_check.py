"""The prepared GPU check (issue 18): one line per step, ``ok`` / ``skip`` / ``FAIL``, under 7 min on one GPU.

    python scripts/gpu_check.py --device cuda      # on a lent GPU
    python scripts/gpu_check.py --device cpu       # everywhere (CI): CUDA-only steps say "skip"

Steps: device facts and optional libraries; the device/dtype/attention resolvers; InternVL-C/G golden
deviation in fp32 (TF32 off, <= 1e-4) and in bf16 (reported); encoder images/s and texts/s in bf16 at
realistic shapes (random weights: ViT-B/16 via open_clip, InternViT-300M); chat golden answers in fp32,
bf16 agreement, ``stream`` equal to ``chat``; vision on ``cuda:0`` with the language model's tail on the
CPU; faiss and bitsandbytes (``skip`` when absent). Exit status 1 when a step fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.devices import bf16_native, describe, flash_attn_importable  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
CG_TINY = FIXTURES / "internvl_cg_tiny"
CHAT_FIXTURES = ("internvl_chat_tiny", "internvl_chat_internlm2_tiny", "internvl_chat_qwen2_tiny")
MAX_NEW = 8  # the chat fixtures' generation_config.max_new_tokens
FP32_LIMIT = 1e-4


class Skip(Exception):
    """The step does not apply here (reason in the message)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        raise Skip("CUDA only")


# ---------------------------------------------------------------------------- steps


def step_facts(device: torch.device) -> str:
    libs = []
    for name in ("faiss", "flash_attn", "bitsandbytes", "open_clip", "accelerate"):
        libs.append(f"{name}={'yes' if importlib.util.find_spec(name) else 'no'}")
    facts = f"torch {torch.__version__}, transformers {importlib.import_module('transformers').__version__}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        capability = torch.cuda.get_device_capability(device)
        facts += (
            f", {torch.cuda.get_device_name(device)} cc {capability[0]}.{capability[1]}"
            f", bf16 native {bf16_native(device)}, free {free / 2**30:.1f}/{total / 2**30:.1f} GiB"
            f", {torch.cuda.device_count()} GPU(s)"
        )
    else:
        facts += f", cpu threads {torch.get_num_threads()}"
    return f"{facts}; {' '.join(libs)} (flash_attn imports: {flash_attn_importable()})"


def step_resolvers(device: torch.device) -> str:
    return " | ".join(
        f"{name}: {describe(device, dtype)}" for name, dtype in (("auto", None), ("fp16", "float16"))
    )


def _cg_deviation(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    from safetensors.torch import load_file

    from retrieval.internvl import InternVLModel

    expected = load_file(str(CG_TINY / "expected.safetensors"))
    model = InternVLModel.from_pretrained(CG_TINY, device=device, dtype=dtype).eval()
    out = {}
    with torch.no_grad():
        pixels = expected["pixel_values_retrieval"].to(device, dtype)
        ids = expected["input_ids"].to(device)
        out["image_c"] = model.encode_image_c(pixels)
        out["image_g"] = model.encode_image_g(pixels)
        out["text"] = model.encode_text(ids)
    reference = {"image_c": "image_embeds_c", "image_g": "image_embeds_g", "text": "text_embeds"}
    return {
        k: float((v.float().cpu() - expected[reference[k]]).abs().max() / expected[reference[k]].abs().max())
        for k, v in out.items()
    }


def step_cg_fp32(device: torch.device) -> str:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        dev = _cg_deviation(device, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    worst = max(dev.values())
    text = ", ".join(f"{k} {v:.2e}" for k, v in dev.items())
    if worst > FP32_LIMIT:
        raise AssertionError(f"relative deviation {text} > {FP32_LIMIT}")
    return f"relative deviation {text} (limit {FP32_LIMIT}, TF32 off)"


def step_cg_bf16(device: torch.device) -> str:
    dev = _cg_deviation(device, torch.bfloat16)
    return "relative deviation " + ", ".join(f"{k} {v:.2e}" for k, v in dev.items()) + " (reported)"


def _rate(fn: Callable[[], object], n: int, device: torch.device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return n / best


def step_encoder_internvit300m(device: torch.device) -> str:
    _cuda_only(device)
    from retrieval.internvl.config import InternVisionConfig
    from retrieval.internvl.vision import InternVisionModel

    config = InternVisionConfig(
        hidden_size=1024, num_attention_heads=16, num_hidden_layers=24, intermediate_size=4096,
        image_size=448, patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
    )  # fmt: skip
    model = InternVisionModel(config).to(device, torch.bfloat16).eval()
    batch = 16
    pixels = torch.randn(batch, 3, 448, 448, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        rate = _rate(lambda: model(pixels), batch, device)
    return (
        f"{rate:.1f} images/s (bf16, 448 px, batch {batch}, random weights); "
        "official reference: skip (not importable)"
    )


def step_encoder_vitb(device: torch.device) -> str:
    _cuda_only(device)
    if importlib.util.find_spec("open_clip") is None:
        raise Skip("open_clip not installed")
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None).to(device, torch.bfloat16).eval()
    batch = 64
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.bfloat16)
    tokens = torch.randint(1, 49000, (batch, 77), device=device)
    with torch.no_grad():
        images = _rate(lambda: model.encode_image(pixels), batch, device)
        texts = _rate(lambda: model.encode_text(tokens), batch, device)
    return (
        f"{images:.0f} images/s, {texts:.0f} texts/s "
        f"(open_clip ViT-B-16 = the reference, bf16, batch {batch}, random weights)"
    )


def _golden_chat(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    prompts = json.loads((FIXTURES / name / "prompts.json").read_text(encoding="utf-8"))
    return prompts, load_file(str(FIXTURES / name / "tiles.safetensors"))


def _answers(model: object, prompts: dict, tiles: dict[str, torch.Tensor], stream: bool = False) -> list[str]:
    out = []
    for case in prompts["cases"]:
        if case["method"] != "chat":
            continue
        pixels = torch.cat([tiles[f"pixel_values.{k}"] for k in case["images"]]) if case["images"] else None
        kwargs = {
            "history": None if case["history_in"] is None else [list(t) for t in case["history_in"]],
            "pixel_values": pixels,
            "num_patches_list": case["num_patches_list_arg"],
            "max_new_tokens": MAX_NEW,
        }
        if stream:
            out.append("".join(model.stream(case["question"], **kwargs)))
        else:
            out.append(model.chat(case["question"], **kwargs))
    return out


_FP32_ANSWERS: dict[str, list[str]] = {}


def step_chat_fp32(device: torch.device) -> str:
    from chat import load_chat_model

    parts = []
    for name in CHAT_FIXTURES:
        prompts, tiles = _golden_chat(name)
        model = load_chat_model(FIXTURES / name, device=device, dtype=torch.float32)
        answers = _answers(model, prompts, tiles)
        expected = [c["response"] for c in prompts["cases"] if c["method"] == "chat"]
        _FP32_ANSWERS[name] = answers
        same = sum(a == e for a, e in zip(answers, expected, strict=True))
        if same != len(expected):
            raise AssertionError(f"{name}: {same}/{len(expected)} golden answers")
        parts.append(f"{name} {same}/{len(expected)}")
    return "golden answers " + ", ".join(parts)


def step_chat_bf16(device: torch.device) -> str:
    from chat import load_chat_model

    parts = []
    for name in CHAT_FIXTURES:
        prompts, tiles = _golden_chat(name)
        expected = [c["response"] for c in prompts["cases"] if c["method"] == "chat"]
        answers = _answers(
            load_chat_model(FIXTURES / name, device=device, dtype=torch.bfloat16), prompts, tiles
        )
        parts.append(f"{name} {sum(a == e for a, e in zip(answers, expected, strict=True))}/{len(expected)}")
    return "bf16 answers equal to the fp32 golden ones: " + ", ".join(parts) + " (reported)"


def step_stream(device: torch.device) -> str:
    from chat import load_chat_model

    name = CHAT_FIXTURES[0]
    prompts, tiles = _golden_chat(name)
    model = load_chat_model(FIXTURES / name, device=device, dtype=torch.float32)
    chat, stream = _answers(model, prompts, tiles), _answers(model, prompts, tiles, stream=True)
    if chat != stream:
        raise AssertionError(
            f"stream differs from chat in {sum(a != b for a, b in zip(chat, stream, strict=True))} case(s)"
        )
    return f"stream == chat on {len(chat)} cases ({name}, fp32)"


def step_split(device: torch.device) -> str:
    _cuda_only(device)
    from chat import load_chat_model

    name = CHAT_FIXTURES[0]
    prompts, tiles = _golden_chat(name)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    layers = config["llm_config"]["num_hidden_layers"]
    gpu = str(torch.device(device.type, device.index or 0))
    device_map = {
        "model.vision_tower": gpu,
        "model.multi_modal_projector": gpu,
        "model.language_model.embed_tokens": gpu,
        "model.language_model.rotary_emb": gpu,
        **{f"model.language_model.layers.{i}": gpu if i < layers // 2 else "cpu" for i in range(layers)},
        "model.language_model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = load_chat_model(FIXTURES / name, device=gpu, dtype=torch.float32, device_map=device_map)
    answers = _answers(model, prompts, tiles)
    expected = [c["response"] for c in prompts["cases"] if c["method"] == "chat"]
    if answers != expected:
        raise AssertionError(
            f"{sum(a != e for a, e in zip(answers, expected, strict=True))} answers differ with the split"
        )
    return (
        f"vision + first {layers // 2} LLM layers on {gpu}, the rest on cpu: "
        f"{len(answers)}/{len(expected)} answers equal"
    )


def step_faiss(device: torch.device) -> str:
    if importlib.util.find_spec("faiss") is None:
        raise Skip("faiss not installed")
    import faiss
    import numpy as np

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2000, 64)).astype("float32")
    faiss.normalize_L2(data)
    index = faiss.IndexFlatIP(64)
    index.add(data)
    _, ids = index.search(data[:10], 1)
    if not (ids[:, 0] == np.arange(10)).all():
        raise AssertionError("flat search does not find the query vectors")
    where = "cpu"
    if device.type == "cuda" and gpus > 0:
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, device.index or 0, index)
        _, gids = gpu_index.search(data[:10], 1)
        if not (gids == ids).all():
            raise AssertionError("GPU flat search differs from the CPU one")
        where = "cpu+gpu"
    return f"flat IP search ok on {where} (faiss {getattr(faiss, '__version__', '?')}, {gpus} faiss GPU(s))"


def step_bitsandbytes(device: torch.device) -> str:
    _cuda_only(device)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes not installed")
    from chat import load_chat_model

    name = CHAT_FIXTURES[0]
    prompts, tiles = _golden_chat(name)
    expected = [c["response"] for c in prompts["cases"] if c["method"] == "chat"]
    parts = []
    pixels = tiles["pixel_values.wide"]
    reference = load_chat_model(FIXTURES / name, device=device, dtype=torch.float16).model
    with torch.no_grad():
        ref_features = reference.model.get_image_features(pixel_values=pixels.to(device, torch.float16))
    ref_features = ref_features if torch.is_tensor(ref_features) else ref_features.pooler_output
    for mode in ("8bit", "4bit"):
        model = load_chat_model(FIXTURES / name, device=device, dtype=torch.float16, quantization=mode)
        with torch.no_grad():
            features = model.model.model.get_image_features(pixel_values=pixels.to(device, torch.float16))
        features = features if torch.is_tensor(features) else features.pooler_output
        error = (features.float() - ref_features.float()).abs().max().item()
        if error != 0.0:
            raise AssertionError(
                f"{mode}: image features changed by {error:.3g} (vision must stay unquantized)"
            )
        same = sum(a == e for a, e in zip(_answers(model, prompts, tiles), expected, strict=True))
        parts.append(f"{mode}: image features exact, {same}/{len(expected)} answers as fp32")
    return "; ".join(parts)


STEPS: list[tuple[str, Callable[[torch.device], str]]] = [
    ("facts", step_facts),
    ("resolvers", step_resolvers),
    ("encoder_golden_fp32", step_cg_fp32),
    ("encoder_golden_bf16", step_cg_bf16),
    ("encoder_speed_internvit300m", step_encoder_internvit300m),
    ("encoder_speed_vitb16", step_encoder_vitb),
    ("chat_golden_fp32", step_chat_fp32),
    ("chat_bf16_agreement", step_chat_bf16),
    ("chat_stream_equals_chat", step_stream),
    ("chat_split_cuda_cpu", step_split),
    ("faiss", step_faiss),
    ("bitsandbytes", step_bitsandbytes),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    importlib.import_module("transformers").utils.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("facts: FAIL --device cuda but torch.cuda.is_available() is False", flush=True)
        return 1
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    only = set(args.only.split(",")) if args.only else None
    failed = 0
    start_all = time.perf_counter()
    for name, step in STEPS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            line = f"ok {step(device)}"
        except Skip as exc:
            line = f"skip ({exc})"
        except Exception as exc:  # noqa: BLE001 - a failing step is reported, the others still run
            failed += 1
            line = f"FAIL {traceback.format_exception_only(type(exc), exc)[-1].strip()}"
        print(f"{name}: {line} [{time.perf_counter() - start:.1f}s]", flush=True)
    print(
        f"total: {'FAIL' if failed else 'ok'} {failed} failed [{time.perf_counter() - start_all:.1f}s]",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
