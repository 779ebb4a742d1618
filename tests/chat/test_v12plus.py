"""InternVL-Chat-V1-2-Plus's config switches (``internvl_chat_v12plus_tiny``): the checkpoint's system message
in every prompt, one square tile per image, pixel-shuffle v1, and a folder's ``preprocessor_config.json``.

``prompts.json`` holds what the official ``InternVLChatModel.chat()`` answers (OpenGVLab/InternVL @2410d1d,
transformers 4.37.2, float32); each case's ``query`` is the reference prompt with image tokens compacted as
``<IMG_CONTEXT>*N``. ``expected.safetensors`` holds the reference pixel values (``<case>_pixel_values``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from _synthetic_reference import pixel_shuffle as reference_pixel_shuffle
from PIL import Image
from safetensors.torch import load_file

from chat import ChatModel, grounded, load_chat_model
from chat import convert as convert_module
from chat.convert import PS_V1_WARNING, chat_settings, pixel_shuffle_v1
from chat.templates import get_template
from chat.transforms import TileTransform

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
V12 = FIXTURES / "internvl_chat_v12plus_tiny"
SYSTEM = "Answer the questions."
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
#: page.png (150x400 -> 56x56) is one of the images Pillow 13's bicubic change affects; the fixture READMEs'
#: tolerance for that change (internvl_chat_tiny: "allow atol 0.1 for that image"). Exact below Pillow 13.
PILLOW_13_ATOL = 0.1
PILLOW_13_IMAGES = {"page.png"}


@pytest.fixture(scope="module")
def prompts() -> dict:
    return json.loads((V12 / "prompts.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cases(prompts: dict) -> dict[str, dict]:
    return {case["name"]: case for case in prompts["cases"]}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(V12 / "expected.safetensors")


@pytest.fixture(scope="module")
def model() -> ChatModel:
    return load_chat_model(V12, device="cpu", dtype=torch.float32)


def images_of(case: dict) -> list[Image.Image]:
    return [Image.open(V12 / "images" / name) for name in case["images"]]


def history_in(case: dict) -> list | None:
    """The history the reference was called with (its chat() appended the new turn to that same list)."""
    if case["history_in"] is None:
        return None
    assert case["history_in"][-1] == [case["question"], case["response"]]
    return [tuple(turn) for turn in case["history_in"][:-1]]


def expand(query: str) -> str:
    """``<IMG_CONTEXT>*N`` -> N image-context tokens."""
    return re.sub(r"<IMG_CONTEXT>\*(\d+)", lambda m: "<IMG_CONTEXT>" * int(m[1]), query)


class QueryCapture:
    """Records the prompts a ChatModel tokenizes."""

    def __init__(self, model: ChatModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.queries: list[str] = []
        encode = model.encode

        def spy(queries):  # noqa: ANN001, ANN202
            self.queries.extend(queries)
            return encode(queries)

        monkeypatch.setattr(model, "encode", spy)


# ---------------------------------------------------------------------------- settings


def test_settings_are_the_checkpoints(model: ChatModel, prompts: dict) -> None:
    settings = model.settings
    assert settings.system_message == prompts["system_message"] == SYSTEM
    assert model.system_message == SYSTEM != get_template("Hermes-2").system_message
    assert (settings.dynamic_image_size, settings.use_thumbnail, settings.ps_version) == (False, False, "v1")
    assert settings.template == prompts["template"] == "Hermes-2"
    assert settings.image_size == 56 and settings.num_image_token == 4
    assert settings.image_processor is None  # no preprocessor_config.json in this folder
    assert isinstance(model.image_transform, TileTransform)


def test_configs_without_system_message_keep_the_template_default(golden_tiny) -> None:  # noqa: ANN001
    assert "system_message" not in json.loads((golden_tiny.path / "config.json").read_text())
    model = golden_tiny.model
    assert model.settings.system_message is None
    assert model.system_message == get_template("Hermes-2").system_message
    prompt = model.build_prompt("Hi", None)
    assert prompt.startswith("<|im_start|>system\n" + model.system_message + "<|im_end|>")


# ---------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("case_name", ["single_image", "follow_up", "two_images"])
def test_one_square_tile_per_image_equals_reference(model: ChatModel, cases: dict, expected: dict,
                                                    case_name: str) -> None:
    case = cases[case_name]
    want = expected[f"{case_name}_pixel_values"]
    for max_num_tiles in (None, 1, 12, 40):  # ignored: the checkpoint does not tile
        pixels, patches = model.tile_images(images_of(case), max_num_tiles)
        assert patches == [1] * len(case["images"])
        assert pixels.shape == want.shape
        for i, name in enumerate(case["images"]):
            if PILLOW_13 and name in PILLOW_13_IMAGES:
                assert (pixels[i] - want[i]).abs().max() <= PILLOW_13_ATOL, name
            else:
                assert torch.equal(pixels[i], want[i]), name


def test_max_num_tiles_is_ignored_and_said_once(model: ChatModel, cases: dict,
                                                caplog: pytest.LogCaptureFixture) -> None:
    model._warned_tiles = False
    image = images_of(cases["single_image"])
    with caplog.at_level(logging.INFO, logger="chat.model"):
        model.tile_images(image, 12)
        model.tile_images(image, 6)
    notes = [r for r in caplog.records if "max_num_tiles" in r.getMessage()]
    assert len(notes) == 1 and "ignored" in notes[0].getMessage()
    # a value the tiling path would reject is ignored too (no tiling happens)
    assert model.tile_images(image, 0)[1] == [1]


def test_pixel_shuffle_v1_is_the_reference_and_warns_once(model: ChatModel, expected: dict,
                                                          caplog: pytest.LogCaptureFixture,
                                                          recwarn: pytest.WarningsRecorder) -> None:
    x = torch.randn(3, 4, 4, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pixel_shuffle_v1(x, 0.5), reference_pixel_shuffle(x, 0.5, "v1"))
    assert not torch.equal(pixel_shuffle_v1(x, 0.5), reference_pixel_shuffle(x, 0.5, "v2"))
    assert model.model.model.pixel_shuffle is pixel_shuffle_v1
    convert_module._PS_V1_WARNED = False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chat.convert"):
        for _ in range(3):
            model.image_features(expected["single_image_pixel_values"])
    assert [r.getMessage() for r in caplog.records if r.name == "chat.convert"] == [PS_V1_WARNING]
    assert not [w for w in recwarn if "ps_version" in str(w.message)]  # logged, never warnings.warn


# ---------------------------------------------------------------------------- prompts and answers


def test_prompts_are_the_reference_queries(model: ChatModel, cases: dict) -> None:
    for case in cases.values():
        patches = model.tile_images(images_of(case))[1] if case["images"] else None
        assert model.build_prompt(case["question"], patches, history_in(case)) == expand(case["query"]), (
            case["name"]
        )


def test_chat_with_pil_images_answers_as_the_reference(model: ChatModel, cases: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    capture = QueryCapture(model, monkeypatch)
    for case in cases.values():
        answer, history = model.chat(
            case["question"], images=images_of(case) or None, history=history_in(case),
            max_new_tokens=8, return_history=True,
        )  # fmt: skip
        assert answer == case["response"], case["name"]
        assert [list(turn) for turn in history] == case["history_out"], case["name"]
        assert capture.queries[-1] == expand(case["query"]), case["name"]


def test_stream_uses_the_checkpoint_system_message(model: ChatModel, cases: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    capture = QueryCapture(model, monkeypatch)
    case = cases["two_images"]
    pieces = list(model.stream(case["question"], images=images_of(case), max_new_tokens=8))
    assert "".join(pieces) == case["response"]
    assert capture.queries == [expand(case["query"])]


def test_batch_chat_uses_the_checkpoint_system_message(model: ChatModel, cases: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    capture = QueryCapture(model, monkeypatch)
    case = cases["single_image"]
    photo = images_of(case)[0]
    answers = model.batch_chat([case["question"]] * 2, images=[photo, photo], max_new_tokens=8)
    assert answers == [case["response"]] * 2  # same prompt twice: no padding, the reference's answer
    assert capture.queries == [expand(case["query"])] * 2


def test_system_message_can_be_replaced_for_one_call(model: ChatModel, cases: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    capture = QueryCapture(model, monkeypatch)
    case = cases["single_image"]
    other = "You are terse."
    model.chat(case["question"], images=images_of(case), max_new_tokens=2, system_message=other)
    list(model.stream(case["question"], images=images_of(case), max_new_tokens=2, system_message=other))
    model.batch_chat([case["question"]], images=images_of(case), max_new_tokens=2, system_message=other)
    want = expand(case["query"]).replace(SYSTEM, other)
    assert capture.queries == [want] * 3
    assert model.system_message == SYSTEM  # the model's own is unchanged
    model.chat(case["question"], images=images_of(case), max_new_tokens=2)
    assert capture.queries[-1] == expand(case["query"])


class _Encoder:
    def encode_texts(self, texts, batch_size: int = 64) -> np.ndarray:  # noqa: ANN001
        return np.ones((len(texts), 4), dtype=np.float32) / 2


class _Index:
    def __init__(self, path: Path) -> None:
        self.row = {"id": 7, "path": str(path), "score": 0.5}

    def __len__(self) -> int:
        return 1

    def search(self, queries: np.ndarray, k: int):  # noqa: ANN201
        return np.array([[7]]), np.array([[0.5]], dtype=np.float32), [[self.row]]


def test_grounded_answers_use_the_checkpoint_system_message(model: ChatModel, cases: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    capture = QueryCapture(model, monkeypatch)
    kwargs = {"index": _Index(V12 / "images" / "photo.png"), "encoder": _Encoder(), "chat_model": model,
              "k": 1, "max_new_tokens": 2, "max_num_tiles": 12}
    out = grounded.answer("Describe the image.", **kwargs)
    assert out["sources"] == [{"id": 7, "path": str(V12 / "images" / "photo.png"), "score": 0.5}]
    _, pieces = grounded.stream_answer("Describe the image.", **kwargs)
    assert "".join(pieces) == out["answer"]
    grounded.answer("Describe the image.", system_message="S", **kwargs)
    want = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\nImage-1: <img>{'<IMG_CONTEXT>' * 4}</img>\n"
        "Describe the image.<|im_end|><|im_start|>assistant\n"
    )
    assert capture.queries == [want, want, want.replace(SYSTEM, "S")]


# ---------------------------------------------------------------------------- preprocessor_config.json


def _with_preprocessor(tmp_path: Path, fixture: str, processor: dict) -> Path:
    folder = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, folder, ignore=shutil.ignore_patterns("expected.safetensors",
                                                                              "tiles.safetensors", "checks"))
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


#: the V1-2-Plus preprocessor_config.json's keys, with another mean/std, bilinear resampling and a resize
#: to 64 then a 56 crop (so that the resampling filter and the crop matter)
PROCESSOR = {
    "crop_size": 56, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.4, 0.5, 0.6],
    "image_std": [0.2, 0.25, 0.3], "resample": 2, "size": 64,
}


def test_non_tiling_checkpoint_uses_its_image_processor(tmp_path: Path, cases: dict) -> None:
    from transformers import CLIPImageProcessorPil

    folder = _with_preprocessor(tmp_path, "internvl_chat_v12plus_tiny", PROCESSOR)
    model = load_chat_model(folder, device="cpu", dtype=torch.float32)
    assert model.settings.image_processor == str(folder)
    photo = images_of(cases["single_image"])[0]
    pixels, patches = model.tile_images([photo, photo.convert("RGBA")])
    assert patches == [1, 1] and pixels.shape == (2, 3, 56, 56)
    # the V1-2 model card: image.resize((448, 448)), then CLIPImageProcessor.from_pretrained(path)
    card = CLIPImageProcessorPil.from_pretrained(folder)(images=photo.resize((56, 56)), return_tensors="pt")
    assert torch.equal(pixels[0], card["pixel_values"][0]) and torch.equal(pixels[1], pixels[0])
    # what that processor does with these settings, by hand: bilinear 56 -> 64, centre crop 56, mean/std
    arr = np.asarray(photo.convert("RGB").resize((56, 56)).resize((64, 64), Image.BILINEAR), np.float32)
    arr = (arr[4:60, 4:60] / 255.0 - np.array(PROCESSOR["image_mean"])) / np.array(PROCESSOR["image_std"])
    torch.testing.assert_close(pixels[0], torch.from_numpy(arr).permute(2, 0, 1).float(), atol=1e-5, rtol=0)
    assert not torch.allclose(pixels[0], TileTransform(56)(photo), atol=0.1)  # not build_transform


def test_tiling_checkpoint_ignores_a_preprocessor_config(tmp_path: Path) -> None:
    folder = _with_preprocessor(tmp_path, "internvl_chat_tiny", PROCESSOR)
    config = json.loads((folder / "config.json").read_text())
    settings = chat_settings(config, folder)
    assert settings.dynamic_image_size is True and settings.image_processor is None
