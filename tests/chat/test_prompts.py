"""Prompt strings and token ids against every case of the three chat fixtures' prompts.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from chat.prompt import (
    build_batch_queries,
    build_query,
    expand_image_placeholders,
    image_tokens,
    load_tokenizer,
    postprocess_response,
    stop_token_id,
    tokenize_batch,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHAT_FIXTURES = ["internvl_chat_tiny", "internvl_chat_internlm2_tiny", "internvl_chat_qwen2_tiny"]


def _prompts(name: str) -> dict:
    return json.loads((FIXTURES / name / "prompts.json").read_text(encoding="utf-8"))


def _chat_patches(case: dict) -> list[int] | None:
    """What chat() used: the list passed, else ``[len(pixel_values)]`` when images were given."""
    if case["num_patches_list_arg"] is not None:
        return case["num_patches_list_arg"]
    return [case["num_tiles"]] if case["images"] else None


def _queries(name: str) -> list[tuple[str, str]]:
    """(expected-ids key, query) for every chat case and batch sample."""
    out = []
    for case in _prompts(name)["cases"]:
        if case["method"] == "chat":
            out.append((case["name"], case["query"]))
        else:
            out.extend((f"{case['name']}.s{i}", q) for i, q in enumerate(case["queries"]))
    return out


@pytest.fixture(scope="module", params=CHAT_FIXTURES)
def golden_prompts(request: pytest.FixtureRequest) -> dict:
    name = request.param
    return {
        "name": name,
        "prompts": _prompts(name),
        "expected": load_file(str(FIXTURES / name / "expected.safetensors")),
        "tokenizer": load_tokenizer(FIXTURES / name),
    }


def test_build_query_equals_every_chat_case(golden_prompts: dict) -> None:
    p = golden_prompts["prompts"]
    cases = [c for c in p["cases"] if c["method"] == "chat"]
    assert len(cases) == 9
    for case in cases:
        query = build_query(
            p["template"], case["question"], num_patches_list=_chat_patches(case),
            num_image_token=p["num_image_token"], history=case["history_in"],
        )  # fmt: skip
        assert query == case["query"], case["name"]
        assert query.count("<IMG_CONTEXT>") == p["num_image_token"] * sum(case["effective_num_patches_list"])


def test_build_batch_queries_equals_batch_case(golden_prompts: dict) -> None:
    p = golden_prompts["prompts"]
    (case,) = [c for c in p["cases"] if c["method"] == "batch_chat"]
    queries = build_batch_queries(
        p["template"], case["questions"], num_patches_list=case["num_patches_list_arg"],
        num_image_token=p["num_image_token"],
    )  # fmt: skip
    assert queries == case["queries"]


def test_token_ids_exact(golden_prompts: dict) -> None:
    tok, expected = golden_prompts["tokenizer"], golden_prompts["expected"]
    for key, query in _queries(golden_prompts["name"]):
        assert tok(query)["input_ids"] == expected[f"{key}.input_ids"].tolist(), key


def test_autotokenizer_gives_the_same_ids(golden_prompts: dict) -> None:
    auto = AutoTokenizer.from_pretrained(str(FIXTURES / golden_prompts["name"]), trust_remote_code=False)
    for key, query in _queries(golden_prompts["name"]):
        assert auto(query)["input_ids"] == golden_prompts["expected"][f"{key}.input_ids"].tolist(), key


def test_left_padded_batch_ids_and_mask(golden_prompts: dict) -> None:
    (case,) = [c for c in golden_prompts["prompts"]["cases"] if c["method"] == "batch_chat"]
    batch = tokenize_batch(golden_prompts["tokenizer"], case["queries"])
    assert batch["input_ids"].tolist() == case["input_ids_padded"]
    assert batch["attention_mask"].tolist() == case["attention_mask"]
    for i, sample in enumerate(case["samples"]):
        assert batch["attention_mask"][i].tolist().count(0) == sample["n_pad_left"]
    hf = golden_prompts["tokenizer"](case["queries"], padding=True, padding_side="left")
    assert hf["input_ids"] == case["input_ids_padded"] and hf["attention_mask"] == case["attention_mask"]


def test_decoded_text_and_response(golden_prompts: dict) -> None:
    p, tok = golden_prompts["prompts"], golden_prompts["tokenizer"]
    for case in p["cases"]:
        responses = [case["response"]] if case["method"] == "chat" else case["responses"]
        for sample, response in zip(case["samples"], responses, strict=True):
            decoded = tok.decode(sample["generate_output_raw"], skip_special_tokens=True)
            assert decoded == sample["decoded_raw"], case["name"]
            assert postprocess_response(decoded, p["template"]) == response, case["name"]


def test_history_out_feeds_next_turn(golden_prompts: dict) -> None:
    cases = {c["name"]: c for c in golden_prompts["prompts"]["cases"]}
    for first, second in [("text_only", "text_multi_turn"), ("image_multi_turn_1", "image_multi_turn_2")]:
        assert cases[second]["history_in"] == cases[first]["history_out"]


# ------------------------------------------------------------------------------------------ rules


def test_placeholder_prepended_only_without_history_and_placeholder() -> None:
    kw = dict(num_patches_list=[2], num_image_token=1, system_message="S")
    assert "user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nq<|im_end|>" in build_query("Hermes-2", "q", **kw)
    with_tag = build_query("Hermes-2", "look: <image> q", **kw)
    assert "user\nlook: <img><IMG_CONTEXT><IMG_CONTEXT></img> q<|im_end|>" in with_tag
    # with history the placeholder stays where it is (the first turn); none is added to the new question
    multi = build_query("Hermes-2", "again", history=[("<image>\nfirst", "ans")], **kw)
    assert multi.index("<img>") < multi.index("first") and "again<|im_end|>" in multi
    with pytest.raises(ValueError, match="0 <image> placeholder"):
        build_query("Hermes-2", "no tag", history=[("q", "a")], **kw)


def test_no_auto_placeholder_raises_when_images_have_no_tag() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        build_query("Hermes-2", "q", num_patches_list=[1], num_image_token=4, image_placeholder_auto=False)


def test_first_remaining_placeholder_in_order() -> None:
    query = expand_image_placeholders("A<image>B<image>C<image>", [1, 2], 1)
    assert query == "A" + image_tokens(1, 1) + "B" + image_tokens(2, 1) + "C<image>"
    assert image_tokens(3, 4) == "<img>" + "<IMG_CONTEXT>" * 12 + "</img>"


def test_text_only_query_has_no_image_tokens() -> None:
    query = build_query("phi3-chat", "hi", num_patches_list=None, num_image_token=256)
    assert query.endswith("<|user|>\nhi<|end|><|assistant|>\n") and "<img>" not in query


@pytest.mark.parametrize("bad", [[0], [-1], [2, 0]])
def test_bad_num_patches(bad: list[int]) -> None:
    with pytest.raises(ValueError, match=">= 1 tile"):
        build_query("Hermes-2", "Image-1: <image> Image-2: <image>", num_patches_list=bad, num_image_token=4)


def test_batch_needs_one_entry_per_question() -> None:
    with pytest.raises(ValueError, match="one num_patches entry per question"):
        build_batch_queries("Hermes-2", ["a", "b"], num_patches_list=[3], num_image_token=4)
    text_only = build_batch_queries("Hermes-2", ["a", "b"], num_patches_list=None, num_image_token=4)
    assert all("<img>" not in q for q in text_only) and len(text_only) == 2


def test_unknown_template_name() -> None:
    with pytest.raises(ValueError, match="known templates"):
        build_query("not-a-template", "q", num_patches_list=None, num_image_token=4)


# ------------------------------------------------------------------------------------- tokenizers


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    for file in ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "config.json"]:  # fmt: skip
        shutil.copy(src / file, dst / file)
        os.chmod(dst / file, 0o644)
    return dst


def test_real_internlm2_tokenizer_folder_maps_to_legacy_llama(tmp_path: Path) -> None:
    """A real InternLM2 folder names the remote-code InternLM2Tokenizer; it must load without remote code."""
    name = "internvl_chat_internlm2_tiny"
    folder = _copy_tokenizer(FIXTURES / name, tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "InternLM2Tokenizer"
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    for key in ("legacy", "add_bos_token"):  # InternLM2Tokenizer's own defaults apply (BOS added)
        cfg.pop(key)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = load_tokenizer(folder)
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    for key, query in _queries(name):
        assert tok(query)["input_ids"] == expected[f"{key}.input_ids"].tolist(), key
    ids = tok("Hello , world .", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Hello, world."  # InternLM2Tokenizer's unconditional clean_up_tokenization


def test_unknown_remote_code_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    folder = _copy_tokenizer(FIXTURES / "internvl_chat_tiny", tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "SomeRemoteTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_some.SomeRemoteTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(folder)
    with pytest.raises(ValueError, match="not a model folder"):
        load_tokenizer(tmp_path / "missing")


def test_stop_token_falls_back_to_eos_when_template_has_none() -> None:
    tok = load_tokenizer(FIXTURES / "internvl_chat_tiny")
    assert stop_token_id(tok, "vicuna_v1.1") == tok.eos_token_id == 2  # sep " " strips to ""
    assert stop_token_id(tok, "phi3-chat") == tok.eos_token_id  # <|end|> is not in this vocabulary


class _NoPadTokenizer:
    pad_token_id = None
    eos_token_id = 9

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_batch_pads_left_with_eos_when_no_pad_token() -> None:
    batch = tokenize_batch(_NoPadTokenizer(), ["ab", "c"])
    assert batch["input_ids"].tolist() == [[97, 98], [9, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
