"""ChatModel.chat / stream / batch_chat against the golden fixtures: greedy ids, texts and histories exact."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from chat.generation import AnswerDecoder, NewTokensRepetitionPenalty, incremental_text
from chat.prompt import load_tokenizer
from chat.templates import get_template

MAX_NEW = 8  # the fixtures' generation_config.max_new_tokens


def _chat_cases(golden) -> list[dict]:
    return [case for case in golden.prompts["cases"] if case["method"] == "chat"]


def _chat_kwargs(golden, case: dict) -> dict:
    return {
        "history": case["history_in"],
        "pixel_values": golden.pixel_values(case["images"]),
        "num_patches_list": case["num_patches_list_arg"],
        "max_new_tokens": MAX_NEW,
    }


def test_greedy_ids_token_for_token(golden) -> None:
    model = golden.model
    for case in _chat_cases(golden):
        ids = model.generate_ids(
            [case["query"]],
            golden.pixel_values(case["images"]),
            generation_config=model.generation_config(max_new_tokens=MAX_NEW),
        )
        assert ids == [golden.expected[f"{case['name']}.generated_ids"].tolist()], case["name"]


def test_chat_answers_and_history(golden) -> None:
    model = golden.model
    for case in _chat_cases(golden):
        history_in = None if case["history_in"] is None else [list(t) for t in case["history_in"]]
        kwargs = _chat_kwargs(golden, case) | {"history": history_in}
        answer, history = model.chat(case["question"], return_history=True, **kwargs)
        assert answer == case["response"], case["name"]
        assert [list(turn) for turn in history] == case["history_out"], case["name"]
        assert history_in == case["history_in"], "the caller's history must not be modified"
        assert model.chat(case["question"], **kwargs) == answer  # without return_history: the answer only


def test_stream_concatenates_to_chat_answer(golden) -> None:
    model = golden.model
    for case in _chat_cases(golden):
        pieces = list(model.stream(case["question"], **_chat_kwargs(golden, case)))
        assert "".join(pieces) == case["response"], case["name"]
        assert all(pieces), "no empty pieces"
        if len(case["response"].split()) > 2:
            assert len(pieces) > 1, "text arrives incrementally"


def test_batch_chat_matches_reference(golden) -> None:
    model = golden.model
    case = golden.cases["batch"]
    pixels = golden.pixel_values(case["images"])
    answers = model.batch_chat(
        case["questions"], pixels, case["num_patches_list_arg"], max_new_tokens=MAX_NEW
    )
    assert answers == case["responses"]
    ids = model.generate_ids(
        case["queries"], pixels, generation_config=model.generation_config(max_new_tokens=8)
    )
    assert ids == [sample["generated_ids"] for sample in case["samples"]]  # post-eos fill dropped
    assert any(s["stopped_on_eos"] for s in case["samples"]) and ids[0][-1] == golden.prompts["eos_token_id"]


def test_chat_with_pil_image_tiles_like_reference(golden) -> None:
    """End to end through tiling: wide.png is unaffected by the Pillow 13 resampling change."""
    case = golden.cases["single_image"]
    image = Image.open(golden.path / "images" / "wide.png")
    answer = golden.model.chat(case["question"], images=[image], max_new_tokens=MAX_NEW)
    assert answer == case["response"]
    pixels, patches = golden.model.tile_images(image)
    assert patches == [case["num_tiles"]]
    assert torch.equal(pixels, golden.tiles["pixel_values.wide"])


def test_several_images_get_numbered_placeholders(golden) -> None:
    images = [Image.open(golden.path / "images" / name) for name in ("wide.png", "tiny.png")]
    answer, history = golden.model.chat(
        "Compare them.", images=images, max_new_tokens=2, max_num_tiles=2, return_history=True
    )
    assert isinstance(answer, str)
    assert history[-1][0] == "Image-1: <image>\nImage-2: <image>\nCompare them."


def test_max_new_tokens_and_sampling(golden) -> None:
    model = golden.model
    query = golden.cases["text_only"]["query"]
    one = model.generate_ids([query], generation_config=model.generation_config(max_new_tokens=1))
    assert len(one[0]) == 1
    torch.manual_seed(0)
    text = model.chat("Hello", max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9)
    assert isinstance(text, str)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_num_tiles": 0, "images": "IMG"}, "max_num_tiles"),
        ({"max_num_tiles": 41, "images": "IMG"}, "max_num_tiles"),
        ({"pixel_values": torch.zeros(3, 3, 56, 56), "num_patches_list": [2]}, "num_patches_list sums"),
        ({"pixel_values": torch.zeros(2, 3, 32, 32)}, "pixel_values must be"),
        ({"pixel_values": torch.zeros(1, 3, 56, 56), "images": "IMG"}, "either images or pixel_values"),
        (
            {
                "pixel_values": torch.zeros(2, 3, 56, 56),
                "num_patches_list": [1, 1],
                "history": [("hi", "yo")],
            },
            "placeholder",
        ),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ],
)
def test_bad_requests_raise_value_error(golden, kwargs: dict, match: str) -> None:
    if kwargs.get("images") == "IMG":
        kwargs = kwargs | {"images": [Image.new("RGB", (20, 20))]}
    with pytest.raises(ValueError, match=match):
        golden.model.chat("What is this?", **kwargs)


def test_batch_chat_bad_requests(golden) -> None:
    model = golden.model
    pixels = golden.tiles["pixel_values.wide"]
    with pytest.raises(ValueError, match="entries for 2 questions"):
        model.batch_chat(["a", "b"], pixels, [7])
    with pytest.raises(ValueError, match="needs num_patches_list"):
        model.batch_chat(["a"], pixels)
    assert model.batch_chat([], None) == []
    assert len(model.batch_chat(["Hi", "Hello there"], None, max_new_tokens=2)) == 2  # text-only batch


def test_stream_close_stops_generation(golden, monkeypatch: pytest.MonkeyPatch) -> None:
    model = golden.model
    real_config = model.generation_config

    def no_stop(**kwargs):
        config = real_config(**kwargs)
        config.eos_token_id = None  # nothing ends generation but max_new_tokens or closing the stream
        return config

    monkeypatch.setattr(model, "generation_config", no_stop)
    monkeypatch.setattr(model, "stop_token_id", -1)
    forwards: list[int] = []
    hook = model.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        pieces = model.stream("Tell me a long story.", max_new_tokens=500)
        assert next(pieces)
        pieces.close()
        after_close = len(forwards)
        assert after_close < 100, "tokens are generated only as the stream is read (500 allowed)"
        assert len(forwards) == after_close
    finally:
        hook.remove()
    monkeypatch.undo()
    text = "".join(model.stream("Hello, who are you?", max_new_tokens=MAX_NEW))
    assert text == golden.cases["text_only"]["response"]


def test_stream_reraises_errors(golden, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(golden.model, "iter_ids", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        list(golden.model.stream("Hi", max_new_tokens=4))


def test_repetition_penalty_counts_new_tokens_only() -> None:
    """The reference's LLM generate() sees inputs_embeds only: the prompt is never penalised."""
    scores = torch.tensor([[2.0, 2.0, -1.0, 0.5]])
    prompt_and_new = torch.tensor([[0, 0, 1, 2]])  # prompt [0, 0], new tokens [1, 2]
    out = NewTokensRepetitionPenalty(2.0, prompt_length=2)(prompt_and_new, scores.clone())
    assert out.tolist() == [[2.0, 1.0, -2.0, 0.5]]


class _PieceTokenizer:
    """Token id -> fixed text piece; ids >= 100 are special (skipped)."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i >= 100))


@pytest.mark.parametrize(
    ("ids", "pieces"),
    [
        ([1, 2, 3, 100], {1: "  Hello", 2: " ", 3: "world ", 100: "<|im_end|>"}),  # strip at both ends
        ([1, 2, 3], {1: "caf", 2: "\ufffd", 3: "é!"}),  # half-decoded character held back
        ([1, 2, 3, 4], {1: "yes", 2: "<|im", 3: "_end|>", 4: " more"}),  # separator spelled out: cut there
        ([100], {100: "<|im_end|>"}),  # empty answer
        ([1, 101, 2], {1: "a", 101: "<box>", 2: "b"}),  # special tokens dropped
    ],
)
def test_incremental_text_adds_up_to_final_answer(ids: list[int], pieces: dict[int, str]) -> None:
    template = get_template("Hermes-2")
    tokenizer = _PieceTokenizer(pieces)
    out = list(incremental_text(iter(ids), tokenizer.decode, template, stop_token_id=100))
    assert "".join(out) == template.postprocess(tokenizer.decode(ids))
    assert all(out)


def test_empty_image_list_means_text_only(golden) -> None:
    case = golden.cases["text_only"]
    assert golden.model.chat(case["question"], images=[], max_new_tokens=MAX_NEW) == case["response"]


def test_answer_decoder_keeps_added_tokens_outside_the_special_map(golden_tiny) -> None:
    """4.37 slow decode: special-map ids skipped, other added tokens kept as text, segments space-joined."""
    tokenizer = load_tokenizer(golden_tiny.path)
    tokenizer.add_tokens(["<|user|>"])  # an added token that is not in the special-tokens map
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    the, what = tokenizer.convert_tokens_to_ids(["▁The", "▁What"])
    decode = AnswerDecoder(tokenizer)
    assert decode([the, 2, what, 32010, the]) == "The What The"  # </s>, <box>: special map, skipped
    assert decode([the, user, what, 32002]) == "The <|user|> What"
    assert decode([32002]) == ""
    ids = [the, 32000, what, the]
    assert decode(ids) == golden_tiny.model.tokenizer.decode(ids, skip_special_tokens=True)


def test_tiny_temperature_samples_as_greedy(golden_tiny) -> None:  # noqa: ANN001
    """Sampling at a vanishing temperature overflows logits / T; it must behave as its limit, greedy."""
    cm = golden_tiny.model
    greedy = cm.chat("Hello, who are you?", max_new_tokens=4)
    assert cm.chat("Hello, who are you?", max_new_tokens=4, do_sample=True, temperature=1e-268) == greedy
