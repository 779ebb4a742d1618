"""Conversation templates: exact strings of the reference conversation.py and the fixtures' template facts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from chat.prompt import load_tokenizer, stop_token_id
from chat.templates import (
    TEMPLATES,
    ConversationTemplate,
    SeparatorStyle,
    available_templates,
    get_template,
    register_template,
    template_for_config,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHAT_FIXTURES = ["internvl_chat_tiny", "internvl_chat_internlm2_tiny", "internvl_chat_qwen2_tiny"]
INTERNVL_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


def _load(name: str, file: str) -> dict:
    return json.loads((FIXTURES / name / file).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", CHAT_FIXTURES)
def test_fixture_template_facts(name: str) -> None:
    prompts = _load(name, "prompts.json")
    template = template_for_config(_load(name, "config.json"))
    assert template.name == prompts["template"]
    assert template.system_message == prompts["system_message"]
    assert template.sep == prompts["template_sep"]
    assert list(template.roles) == prompts["template_roles"]
    assert template.stop_str == prompts.get("template_stop_str")
    assert template.stop_token == prompts["eos_token"]


@pytest.mark.parametrize("name", CHAT_FIXTURES)
def test_stop_token_id_is_what_chat_passes_to_generate(name: str) -> None:
    prompts = _load(name, "prompts.json")
    tokenizer = load_tokenizer(FIXTURES / name)
    template = get_template(prompts["template"])
    assert stop_token_id(tokenizer, template) == prompts["eos_token_id"]
    assert stop_token_id(tokenizer, template.name) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_hermes2_mpt_rendering_exact() -> None:
    t = get_template("Hermes-2")
    prompt = t.build_prompt("Q2", [("Q1", "A1")])
    assert prompt == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )


def test_empty_message_renders_without_separator() -> None:
    t = get_template("Hermes-2")
    prompt = t.build_prompt("Why?", [("Say nothing.", "")], system_message="S")
    assert prompt == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nSay nothing.<|im_end|>"
        "<|im_start|>assistant\n<|im_start|>user\nWhy?<|im_end|><|im_start|>assistant\n"
    )
    assert t.render(["Q", None], system_message="S") == t.render(["Q", ""], system_message="S")


def test_internlm2_chat_renders_like_hermes2() -> None:
    history = [("a", "b"), ("c", "")]
    assert get_template("internlm2-chat").build_prompt("q", history) == get_template("Hermes-2").build_prompt(
        "q", history
    )
    assert get_template("internlm2-chat").stop_str is None


def test_phi3_chat_exact() -> None:
    t = get_template("phi3-chat")
    assert t.system_message == INTERNVL_SYSTEM
    assert t.stop_token == "<|end|>"
    expected = "<|system|>\nS<|end|><|user|>\nHi<|end|><|assistant|>\n"
    assert t.build_prompt("Hi", system_message="S") == expected


def test_internvl2_5_newline_after_separator_and_stop_token() -> None:
    t = get_template("internvl2_5")
    assert t.system_message.startswith("你是书生·万象，英文名是InternVL")
    assert t.sep == "<|im_end|>\n" and t.stop_token == "<|im_end|>"
    assert t.build_prompt("Hi", [("a", "b")], system_message="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert t.postprocess(" answer <|im_end|>\nrest") == "answer"


def test_other_styles() -> None:
    zh = get_template("internvl_zh")
    assert zh.build_prompt("q", [("a", "b")]) == " <human>: a <bot>: b</s><human>: q <bot>:"
    vicuna = get_template("vicuna_v1.1")
    assert vicuna.render(["q", None], system_message="S") == "S USER: q ASSISTANT:"
    assert vicuna.postprocess("  x  ") == "x"


def test_postprocess_cuts_at_stop_token() -> None:
    t = get_template("Hermes-2")
    assert t.postprocess("  hello <|im_end|> tail") == "hello"
    assert t.postprocess("no stop") == "no stop"


def test_unknown_template_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown conversation template 'nope'.*Hermes-2.*phi3-chat"):
        get_template("nope")
    with pytest.raises(ValueError, match="template"):
        template_for_config({"model_type": "internvl_chat"})
    assert {"Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5"} <= set(available_templates())


def test_templates_are_frozen_data() -> None:
    t = get_template("Hermes-2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.sep = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        TEMPLATES["x"] = t  # type: ignore[index]
    other = t.with_system_message("other")
    assert other.system_message == "other" and t.system_message == INTERNVL_SYSTEM
    with pytest.raises(ValueError, match="already registered"):
        register_template(t)


def test_register_custom_template() -> None:
    custom = ConversationTemplate(
        name="test-custom", system_template="[{system_message}]", system_message="sys",
        roles=("U:", "A:"), sep_style=SeparatorStyle.MPT, sep="|",
    )  # fmt: skip
    register_template(custom, override=True)
    assert get_template("test-custom").build_prompt("q") == "[sys]|U:q|A:"


def test_history_turn_must_be_pair() -> None:
    with pytest.raises(ValueError, match="pairs"):
        get_template("Hermes-2").build_prompt("q", [("only one",)])
