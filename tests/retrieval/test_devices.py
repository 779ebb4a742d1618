"""The one device / dtype / attention resolver (retrieval.devices), with CUDA faked where one is needed."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api.__main__ import parse_args, settings_from_args
from api.settings import Settings
from retrieval import devices, load_encoder

ROOT = Path(__file__).resolve().parents[2]
SPELLINGS = {
    "float32": torch.float32, "fp32": torch.float32, "FP32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "BF16": torch.bfloat16,
    "torch.bfloat16": torch.bfloat16,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_everywhere(name: str) -> None:
    want = SPELLINGS[name]
    assert devices.parse_dtype(name) is want
    assert devices.resolve_dtype(name, torch.device("cpu")) is want
    canonical = devices.dtype_arg(name)
    assert devices.parse_dtype(canonical) is want
    assert Settings(dtype=name).dtype == name
    assert settings_from_args(parse_args(["--dtype", name])).dtype == canonical


@pytest.mark.parametrize("name", ["auto", "AUTO", None])
def test_auto_is_float32_on_cpu(name: str | None) -> None:
    assert devices.parse_dtype(name) is None
    assert devices.resolve_dtype(name, torch.device("cpu")) is torch.float32


@pytest.mark.parametrize("bad", ["bf17", "int8", "", "float64"])
def test_unknown_spellings_are_refused_with_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="bfloat16/bf16|bf16"):
        devices.parse_dtype(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        devices.dtype_arg(bad)
    with pytest.raises(ValueError):
        Settings(dtype=bad)
    with pytest.raises(SystemExit):
        parse_args(["--dtype", bad])
    with pytest.raises(ValueError):
        devices.parse_dtype(torch.int8)


def test_resolve_device() -> None:
    assert devices.resolve_device(None).type in ("cpu", "cuda")
    assert devices.resolve_device("auto") == devices.resolve_device(None)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        devices.resolve_device("gpu0")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """A CUDA device whose capability and bf16 support the test sets."""
    state = {"capability": (8, 0), "bf16_hw": True, "bf16_emulated": True}

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return state["bf16_hw"] or (including_emulation and state["bf16_emulated"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    devices._warned_capability.clear()
    return state


def test_default_dtype_on_cuda_is_bf16_only_where_native(fake_cuda: dict) -> None:
    cuda = devices.resolve_device(None)
    assert cuda == torch.device("cuda")
    assert devices.resolve_dtype(None, cuda) is torch.bfloat16  # A100 / H100
    fake_cuda.update(capability=(7, 5), bf16_hw=False)  # T4: bf16 only emulated (pytorch#148322)
    assert torch.cuda.is_bf16_supported() is True  # what the old check saw
    assert devices.resolve_dtype(None, cuda) is torch.float16
    assert devices.resolve_dtype("bf16", cuda) is torch.bfloat16  # an explicit choice stands
    from chat.loader import default_dtype

    assert default_dtype(cuda) is torch.float16
    with pytest.raises(ValueError, match="only 2 GPU"):
        devices.resolve_device("cuda:5")


def test_flash_attn_needs_ampere_and_an_importable_package(
    fake_cuda: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(devices, "flash_attn_importable", lambda: True)
    assert devices.attention_implementation(cuda, torch.bfloat16) == "flash_attention_2"
    assert devices.attention_implementation(cuda, torch.float32) == "sdpa"
    assert devices.attention_implementation(torch.device("cpu"), torch.bfloat16) == "sdpa"
    fake_cuda["capability"] = (7, 0)  # V100
    with caplog.at_level(logging.WARNING, logger="retrieval.devices"):
        for _ in range(3):
            assert devices.attention_implementation(cuda, torch.float16) == "sdpa"
    assert len([r for r in caplog.records if "compute capability" in r.message]) == 1
    fake_cuda["capability"] = (9, 0)
    monkeypatch.setattr(devices, "flash_attn_importable", lambda: False)  # installed for another torch
    assert devices.attention_implementation(cuda, torch.bfloat16) == "sdpa"
    from chat import loader

    assert loader.attention_implementation is devices.attention_implementation


def test_broken_flash_attn_install_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    devices.flash_attn_importable.cache_clear()
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: object())

    def broken(name: str):  # noqa: ANN202
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(importlib, "import_module", broken)
    try:
        assert devices.flash_attn_importable() is False
    finally:
        devices.flash_attn_importable.cache_clear()


def test_internvl_attention_skips_flash_on_old_gpus(fake_cuda: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """retrieval.internvl.attention calls flash-attn only where flash_attn_usable says so."""
    from retrieval.internvl import attention

    calls = []
    monkeypatch.setattr(attention, "_flash_attn_func", lambda: lambda *a, **k: calls.append(1))
    monkeypatch.setattr(attention, "flash_attn_usable", lambda device, dtype: False)
    q = torch.randn(1, 2, 3, 4)
    out = attention.attend(q, q, q)
    assert calls == [] and out.shape == q.shape


def test_load_encoder_bf16_on_cpu() -> None:
    fixture = ROOT / "tests" / "fixtures" / "internvl_cg_tiny"
    enc32 = load_encoder(str(fixture), device="cpu", dtype="fp32")
    enc16 = load_encoder(str(fixture), device="cpu", dtype="bf16")
    assert enc16.dtype is torch.bfloat16 and enc32.dtype is torch.float32
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    a, b = enc32.encode_images([image]), enc16.encode_images([image])
    assert a.dtype == b.dtype == np.float32
    assert float(a[0] @ b[0]) > 0.98  # same embedding, bf16 rounding
    assert enc16.encode_texts(["a red square"]).shape == (1, enc16.embed_dim)


def test_build_index_cli_bf16_on_cpu(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 20), (80 * i, 40, 200)).save(photos / f"{i}.png")
    fixture = ROOT / "tests" / "fixtures" / "internvl_cg_tiny"
    cmd = [sys.executable, "scripts/build_index.py", str(photos), "--index", str(tmp_path / "idx"),
           "--model", str(fixture), "--dtype", "bf16", "--device", "cpu", "--workers", "0",
           "--no-progress"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["added"] == 3, summary
    bad = subprocess.run([*cmd[:-1], "--dtype", "bf17"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown dtype 'bf17'" in bad.stderr
