"""The bundled demo chat model: loads through load_chat_model("demo"), answers held-out shape questions,
reloads bit-identically from its files, stays within the size budget."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chat.convert import is_original_format, original_state_dict
from chat.loader import DEMO_CHAT_MODEL_DIR, load_chat_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import chat_shapes  # noqa: E402
import eval_demo_chat  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (DEMO_CHAT_MODEL_DIR / "config.json").is_file(), reason="demo chat model not built"
)
MAX_BUNDLE_BYTES = 25 * 2**20
#: lower bounds per question kind on the small sets below (140 rendered / 70 PIL-drawn questions: 20 / 10 per
#: kind over the five languages), 10 points under the accuracy measured on them (chat/demo_model/README.md).
RENDERED_MIN = {"colour": 90.0, "shape": 90.0, "colour_shape": 90.0, "count": 70.0, "position": 90.0,
                "yesno": 80.0, "which": 75.0}  # fmt: skip
PIL_MIN = {"colour": 90.0, "shape": 80.0, "colour_shape": 70.0, "count": 70.0, "position": 90.0,
           "yesno": 90.0, "which": 80.0}  # fmt: skip


@pytest.fixture(scope="module")
def demo():
    return load_chat_model("demo", device="cpu")


def test_demo_alias_is_an_original_format_checkpoint(demo) -> None:  # noqa: ANN001
    config = json.loads((DEMO_CHAT_MODEL_DIR / "config.json").read_text())
    assert is_original_format(config) and config["model_type"] == "internvl_chat"
    assert config["template"] == "Hermes-2" and config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert demo.settings.template == "Hermes-2" and demo.settings.num_image_token == 16
    assert type(demo.model).__name__ == "InternVLForConditionalGeneration"


def test_bundle_size_and_recorded_hashes() -> None:
    files = [f for f in DEMO_CHAT_MODEL_DIR.iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= MAX_BUNDLE_BYTES
    recorded = json.loads((DEMO_CHAT_MODEL_DIR / "training.json").read_text())["sha256"]
    assert recorded, "training.json records no hashes"
    for name, digest in recorded.items():
        assert hashlib.sha256((DEMO_CHAT_MODEL_DIR / name).read_bytes()).hexdigest() == digest, name


def test_reloads_bit_identically() -> None:
    """Loaded in the stored dtype, the converted model holds exactly the stored tensors."""
    config = json.loads((DEMO_CHAT_MODEL_DIR / "config.json").read_text())
    stored = load_file(DEMO_CHAT_MODEL_DIR / "model.safetensors")
    model = load_chat_model("demo", device="cpu", dtype=torch.float16)
    back = original_state_dict(model.model.state_dict(), config)
    assert sorted(back) == sorted(stored)
    for name, tensor in stored.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def _accuracy(demo, n: int, seed: int, *, pil: bool) -> dict:  # noqa: ANN001
    samples = eval_demo_chat.balanced_samples(n, seed, pil=pil)
    return eval_demo_chat.evaluate(demo, samples)["accuracy"]


def test_held_out_rendered_questions(demo) -> None:  # noqa: ANN001
    acc = _accuracy(demo, 140, 4242, pil=False)
    for kind, bound in RENDERED_MIN.items():
        assert acc[kind]["all"] >= bound, (kind, acc[kind])


def test_held_out_pil_drawn_questions(demo) -> None:  # noqa: ANN001
    acc = _accuracy(demo, 70, 4343, pil=True)
    for kind, bound in PIL_MIN.items():
        assert acc[kind]["all"] >= bound, (kind, acc[kind])


@pytest.mark.parametrize(("question", "shape", "colour", "expected"), [
    ("What colour is the shape?", "star", "blue", "blue"),
    ("图中的形状是什么颜色？", "circle", "green", "绿色"),
    ("What shape is this?", "heart", "red", "heart"),
    ("这是什么形状？", "triangle", "yellow", "三角形"),
    ("Is there a blue star?", "star", "blue", "Yes"),
    ("Is there a blue star?", "star", "red", "No"),
])  # fmt: skip
def test_issue_phrasings(demo, question: str, shape: str, colour: str, expected: str) -> None:  # noqa: ANN001
    import random

    image, _ = chat_shapes.single_shape(random.Random(91), shape, colour)
    assert demo.chat(question, images=[image], max_new_tokens=8) == expected


def test_which_image_in_the_official_format(demo) -> None:  # noqa: ANN001
    import random

    rng = random.Random(17)
    images = [chat_shapes.single_shape(rng, s, c)[0] for s, c in
              (("triangle", "red"), ("triangle", "green"), ("circle", "green"))]  # fmt: skip
    question = "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nWhich image shows a green triangle?"
    assert demo.chat(question, images=images, max_new_tokens=8) == "Image-2"
    zh = "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\n哪张图片里有绿色的三角形？"
    assert demo.chat(zh, images=images, max_new_tokens=8) == "Image-2"
