"""GPU paths of the chat loader, checked on the CPU (issue 18, defects 1, 7-11).

* 8/4-bit: only the language model's linears are quantized (bitsandbytes' CPU kernels on a width-128
  synthetic model where bitsandbytes is installed; transformers' module selection on a meta model always);
  4-bit computes in the requested dtype with NF4;
* placement is shared by both folder formats (mocked CUDA): ``"auto"`` when the model does not fit on
  ``cuda:N`` and more GPUs follow, restricted to GPUs >= N; the quantization guard; 0.5 / 1 byte per
  parameter for 4 / 8 bit; ``max_memory`` and ``offload_folder`` reach ``from_pretrained`` (disk offload);
* original checkpoints stream: every stored tensor is read once, one at a time;
* ``--load-in`` / ``--device-map`` (``IVL_LOAD_IN`` / ``IVL_DEVICE_MAP``) reach ``load_chat_model``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import InternVLForConditionalGeneration

import chat.loader as loader
from chat import load_chat_model
from chat.convert import convert_state_dict, native_config, tie_lm_head
from tests.chat._synthetic import TOKENIZER_FILES, Spec, save_weights, write_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = FIXTURES / "internvl_chat_tiny"
OLD_SKIP = ["vision_tower", "multi_modal_projector", "lm_head"]  # the pre-fix list, for the meta check
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

WIDE = Spec(
    name="w128",
    llm="llama",
    template="Hermes-2",
    vit_hidden=128,
    vit_heads=2,
    vit_mlp=256,
    llm_hidden=128,
    llm_heads=4,
    llm_kv_heads=2,
    llm_mlp=256,
)


@pytest.fixture
def fake_bnb_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantization_config`` builds its config even where bitsandbytes is not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loader.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a),
    )


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor]]:
    """Native config and converted fp32 state of the width-128 synthetic checkpoint."""
    config, state = write_checkpoint(WIDE, tmp_path_factory.mktemp("w128"))
    converted, tied = tie_lm_head(convert_state_dict(state, config, dtype=torch.float32), config)
    return native_config(config, image_token_id=32005, tie_word_embeddings=tied), converted


# ---------------------------------------------------------------------------- defect 1: what is quantized


def _quantized_names(skip: list[str]) -> set[str]:
    """Linears transformers' bitsandbytes replacement would convert, on a meta model."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = native_config(json.loads((TINY / "config.json").read_text()), image_token_id=32005)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return {
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    }


def test_skip_modules_leave_only_language_model_linears() -> None:
    """transformers 5 matches skip names from the start of the full module name: ``model.`` is needed."""
    converted = _quantized_names(list(loader.QUANT_SKIP_MODULES))
    assert converted, "no linear would be quantized"
    assert all(name.startswith("model.language_model.layers.") for name in converted), sorted(converted)
    assert any(".self_attn.q_proj" in n for n in converted) and any(".mlp.down_proj" in n for n in converted)
    old = _quantized_names(OLD_SKIP)
    assert any(n.startswith("model.vision_tower.") for n in old)  # what the pre-fix list let through


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_load_keeps_image_features_exact(mode: str, wide: tuple[Any, dict]) -> None:
    """bitsandbytes' CPU kernels, width 128: image features unchanged (error 0), LM linears quantized."""
    import bitsandbytes as bnb

    config, state = wide
    reference = InternVLForConditionalGeneration.from_pretrained(None, config=config, state_dict=dict(state))
    model = InternVLForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=dict(state),
        dtype=torch.float32,
        device_map={"": "cpu"},
        quantization_config=loader.quantization_config(mode, torch.float32),
    )
    pixels = torch.randn(2, 3, WIDE.image_size, WIDE.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.model.get_image_features(pixel_values=pixels)
        actual = model.model.get_image_features(pixel_values=pixels)
    expected = expected if torch.is_tensor(expected) else expected.pooler_output
    actual = actual if torch.is_tensor(actual) else actual.pooler_output
    assert (actual - expected).abs().max().item() == 0.0
    quantized = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    layer = model.model.language_model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(linear, quantized)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.multi_modal_projector.linear_1) is torch.nn.Linear
    assert type(model.model.vision_tower.encoder.layer[0].attention.q_proj) is torch.nn.Linear


# ---------------------------------------------------------------------------- defect 8: 4-bit settings


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_4bit_computes_in_the_requested_dtype_with_nf4(dtype: torch.dtype, fake_bnb_spec: None) -> None:
    config = loader.quantization_config("4bit", dtype)
    assert config.bnb_4bit_compute_dtype == dtype
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert list(config.llm_int8_skip_modules) == list(loader.QUANT_SKIP_MODULES)
    eight = loader.quantization_config("8bit", dtype)
    assert eight.load_in_8bit and list(eight.llm_int8_skip_modules) == list(loader.QUANT_SKIP_MODULES)


# ---------------------------------------------------------------------------- mocked CUDA


class FakeCuda:
    """``torch.cuda`` facts for ``count`` GPUs with ``free`` bytes each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, free: int) -> None:
        self.free = free
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, 2 * self.free))


GIB = 2**30


def test_4bit_and_8bit_memory_estimates(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch, count=2, free=10 * GIB)
    cuda = torch.device("cuda:0")
    n = 15 * GIB  # 15 GiB at 8 bit > 0.85 x 10 GiB; 7.5 GiB at 4 bit fits
    assert loader.default_device_map(cuda, n, torch.float16, "8bit") == "auto"
    assert loader.default_device_map(cuda, n, torch.float16, "4bit") == {"": "cuda:0"}
    assert loader.default_device_map(cuda, n // 4, torch.float16, None) == {"": "cuda:0"}  # 7.5 GiB
    assert loader.default_device_map(cuda, n, torch.float16, None) == "auto"


def test_auto_respects_the_cuda_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda:1`` of 3 GPUs: split over GPUs 1 and 2 (and the host), never GPU 0; ``cuda:2`` stays put."""
    FakeCuda(monkeypatch, count=3, free=10 * GIB)
    kwargs = loader.placement(torch.device("cuda:1"), 15 * GIB, torch.bfloat16)
    assert kwargs["device_map"] == "auto"
    assert set(kwargs["max_memory"]) == {1, 2, "cpu"}
    assert kwargs["max_memory"][1] == 10 * GIB
    last = loader.placement(torch.device("cuda:2"), 15 * GIB, torch.bfloat16)
    assert last["device_map"] == {"": "cuda:2"} and "max_memory" not in last
    given = loader.placement(
        torch.device("cuda:1"),
        1,
        torch.bfloat16,
        device_map="auto",
        max_memory={1: "5GiB"},
        offload_folder="x",
    )
    assert given == {"device_map": "auto", "max_memory": {1: "5GiB"}, "offload_folder": "x"}


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny golden fixture saved in the HF-native layout (``model_type: internvl``)."""
    folder = tmp_path_factory.mktemp("native")
    load_chat_model(TINY, device="cpu", dtype=torch.float32).model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY / name, folder / name)
    return folder


class Captured(Exception):
    """Raised by the mocked ``from_pretrained`` once it has its arguments."""


def _capture_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, args=args)
        raise Captured

    monkeypatch.setattr(InternVLForConditionalGeneration, "from_pretrained", fake)
    return seen


@pytest.mark.parametrize("folder_kind", ["native", "original"])
def test_both_formats_split_over_gpus(
    folder_kind: str, native_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 7: an HF-native folder too big for one of two GPUs gets ``device_map="auto"`` as well."""
    folder = native_folder if folder_kind == "native" else TINY
    n_params = loader.count_parameters(loader.safetensors_files(folder))
    fake = FakeCuda(monkeypatch, count=2, free=int(n_params * 2 / 0.85) - 1024)  # fp16 does not fit
    seen = _capture_from_pretrained(monkeypatch)
    with pytest.raises(Captured):
        load_chat_model(folder, device="cuda:0", dtype=torch.float16, attn_implementation="sdpa")
    assert seen["device_map"] == "auto"
    fake.free = 10 * GIB
    with pytest.raises(Captured):
        load_chat_model(
            folder, device="cuda:0", dtype=torch.float16, attn_implementation="sdpa", max_memory={0: "1GiB"}
        )
    assert seen["device_map"] == {"": "cuda:0"} and seen["max_memory"] == {0: "1GiB"}


@pytest.mark.parametrize("folder_kind", ["native", "original"])
def test_quantization_needs_cuda_on_both_formats(folder_kind: str, native_folder: Path) -> None:
    folder = native_folder if folder_kind == "native" else TINY
    with pytest.raises(ValueError, match="CUDA"):
        load_chat_model(folder, device="cpu", quantization="8bit")


def test_disk_offload_loads_with_offload_folder(tmp_path: Path) -> None:
    """Defect 9: a map that spills to disk loads (``offload_folder``) and gives the same logits."""
    plain = load_chat_model(TINY, device="cpu", dtype=torch.float32)
    spill = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model": "cpu",
        "lm_head": "disk",
    }
    offloaded = load_chat_model(
        TINY, device="cpu", dtype=torch.float32, device_map=spill, offload_folder=tmp_path
    )
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = plain.model(input_ids=ids).logits
        actual = offloaded.model(input_ids=ids).logits
    assert torch.equal(actual, expected)
    assert any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- defect 10: streaming


def test_original_checkpoint_streams_one_tensor_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stored tensor is read once through ``safe_open``, and at most one is alive at a time."""
    config, state = write_checkpoint(Spec(name="stream", llm="llama", template="Hermes-2"), tmp_path)
    save_weights(state, tmp_path)  # bf16, loaded as fp32: a stored tensor dies once converted
    live: set[int] = set()
    reads: list[str] = []
    peak = [0]
    real_open = loader.safe_open

    class Handle:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __enter__(self) -> Handle:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self.inner.keys())

        def get_slice(self, name: str) -> Any:
            return self.inner.get_slice(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            tensor = self.inner.get_tensor(name)
            reads.append(name)
            live.add(id(tensor))
            weakref.finalize(tensor, live.discard, id(tensor))
            peak[0] = max(peak[0], len(live))
            return tensor

    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: Handle(real_open(*a, **k)))
    model = load_chat_model(tmp_path, device="cpu", dtype=torch.float32)
    assert sorted(reads) == sorted(state), "every stored tensor read exactly once"
    assert peak[0] == 1, f"{peak[0]} stored tensors alive at once"
    eager = convert_state_dict(state, config, dtype=torch.float32)
    loaded = model.model.state_dict()
    for key in ("model.vision_tower.encoder.layer.0.attention.k_proj.weight", "lm_head.weight"):
        assert torch.equal(loaded[key], eager[key])


def test_split_parts_do_not_keep_the_fused_tensor() -> None:
    """A q/k/v part loaded in the stored dtype owns its memory (no view into the fused ``qkv``)."""
    model = load_chat_model(TINY, device="cpu", dtype=torch.bfloat16).model
    q = model.model.vision_tower.encoder.layer[0].attention.q_proj.weight
    assert q.untyped_storage().nbytes() == q.nbytes


# ---------------------------------------------------------------------------- defect 11: CLI / Settings


def test_cli_and_env_expose_quantization_and_device_map(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.__main__ import parse_args, settings_from_args
    from api.settings import Settings

    settings = settings_from_args(parse_args(["--load-in", "4bit", "--device-map", "auto"]))
    assert (settings.load_in, settings.device_map) == ("4bit", "auto")
    with pytest.raises(SystemExit):
        parse_args(["--load-in", "3bit"])
    monkeypatch.setenv("IVL_LOAD_IN", "8bit")
    monkeypatch.setenv("IVL_DEVICE_MAP", '{"": "cuda:1"}')
    settings = Settings()
    assert (settings.load_in, settings.device_map) == ("8bit", {"": "cuda:1"})


def test_app_passes_quantization_and_device_map(monkeypatch: pytest.MonkeyPatch) -> None:
    import chat
    from api.app import _load
    from api.metrics import Metrics
    from api.service import Service
    from api.settings import Settings

    seen: dict[str, Any] = {}
    monkeypatch.setattr(chat, "load_chat_model", lambda path, **kw: seen.update(kw, path=path) or "model")
    settings = Settings(chat_model="x", load_in="8bit", device_map="auto", device="cpu", reload_interval_s=0)
    service = Service(settings=settings, metrics=Metrics())
    asyncio.run(_load(service, object(), None, lambda path: None))
    assert seen["quantization"] == "8bit" and seen["device_map"] == "auto"
    assert service.chat_model == "model"
