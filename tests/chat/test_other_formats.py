"""Original-format checkpoints the golden fixtures do not cover, checked against an independent reference.

Tiny checkpoints are built here in about a second each (``_synthetic``):

* ``phi3``: Phi-3 LLM (Mini-InternVL-Chat-4B-V1-5 layout: fused ``qkv_proj`` / ``gate_up_proj``, ``su``
  rope scaling whose short/long switch is crossed while decoding, template ``phi3-chat``, stop ``<|end|>``);
* ``phi3_window``: Phi-3 with a sliding window shorter than the prompts;
* ``vit6b_v1`` / ``vit6b_v2_layer-4``: InternViT-6B-style vision (InternVL-Chat-V1-2-Plus / V1-5:
  ``rms_norm``, q/k RMSNorm over all heads, no qkv bias, ``ps_version`` v1 / v2, ``select_layer`` -1 / -4)
  with a LLaMA LLM;
* ``internlm2_vit6b``: InternViT-6B + InternLM2 with q/k/v/o biases and 4 query heads per kv head.

``chat.load_chat_model`` must match the reference (``_synthetic_reference``, written from the official code,
not importing ``chat``) within the golden fixtures' tolerances: vision ``1e-5 + 1e-5|e|``, logits
``1e-4 + 1e-4|e|``, prompts, token ids, greedy ids (chat, multi-turn, batch_chat, stream) and texts exact.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from chat import load_chat_model
from tests.chat._synthetic import (
    GOLDEN,
    GOLDEN_INTERNLM2,
    Spec,
    added_tokens,
    save_weights,
    special_map_tokens,
    write_checkpoint,
)
from tests.chat._synthetic_reference import (
    HERMES_2,
    PHI3_CHAT,
    InternLM2Reference,
    ReferenceLLM,
    SlowLlamaTokenizerReference,
    SuScaledRotary,
    extract_feature,
    merge_image_embeds,
    reference_query,
)

VISION_TOL = 1e-5  # |a - e| <= 1e-5 + 1e-5 |e|
LOGIT_TOL = 1e-4  # |a - e| <= 1e-4 + 1e-4 |e|
MAX_NEW = 8

SPECS = [
    Spec(name="phi3", llm="phi3", template="phi3-chat", seed=3, phi3_tokens_in_special_map=True),
    # Phi-3-mini-4k style sliding window, shorter than the prompts (the reference masks it in eager attention)
    Spec(
        name="phi3_window",
        llm="phi3",
        template="phi3-chat",
        seed=4,
        rope_type=None,
        sliding_window=40,
        phi3_tokens_in_special_map=True,
    ),
    Spec(
        name="vit6b_v1", llm="llama", template="Hermes-2", vision="6b", vit_layers=3, ps_version="v1", seed=5
    ),
    # InternVL-Chat-V1-5 layout: InternViT-6B + InternLM2 (with q/k/v/o biases, 4 query heads per kv head)
    Spec(
        name="internlm2_vit6b",
        llm="internlm2",
        template="internlm2-chat",
        vision="6b",
        vit_layers=3,
        seed=13,
        llm_heads=8,
        llm_kv_heads=2,
    ),
    Spec(
        name="vit6b_v2_layer-4",
        llm="llama",
        template="Hermes-2",
        vision="6b",
        vit_layers=5,
        select_layer=-4,
        ps_version="v2",
        seed=8,
    ),
]

CASES = [  # name, question, tiles per image, history-from-case
    ("text_only", "Hello, who are you?", [], None),
    ("single_image", "Please describe the image shortly.", [3], None),
    (
        "two_images",
        "Image-1: <image>\nImage-2: <image>\nWhat differs between these two images?",
        [2, 3],
        None,
    ),
    ("multi_turn", "Please write a poem according to the image.", [3], "single_image"),
]
EVENT_CASE = "single_image"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = diff > tol + tol * expected.abs()
    assert not bool(bad.any()), (
        f"{what}: max |diff| {diff.max().item():.3g} over tolerance ({int(bad.sum())} bad)"
    )


@dataclass
class Built:
    """One synthetic checkpoint, its reference results per case and the loaded ChatModel."""

    spec: Spec
    folder: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    tokenizer: SlowLlamaTokenizerReference
    template: dict[str, Any]
    stop_id: int
    events: list[tuple[int, int]]
    img_context_id: int
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch: list[dict[str, Any]] = field(default_factory=list)
    chat_model: Any = None

    @property
    def num_image_token(self) -> int:
        return 4

    def decode(self, ids: list[int]) -> str:
        """Reference chat() text: skip special-map ids, decode, ``split(sep)[0].strip()``."""
        special = {
            self.tokenizer.added[t][0] for t in self.tokenizer.all_special if t in self.tokenizer.added
        }
        special |= {0, 1, 2}
        other_added = {i for i, _ in self.tokenizer.added.values()} - special - {self.stop_id}
        assert not other_added & set(ids), "case design: a non-special added token was generated"
        kept = [i for i in ids if i not in special and i != self.stop_id]
        return self.tokenizer.sp.decode(kept).split(self.template["sep"])[0].strip()


def _case_inputs(b: Built, name: str) -> tuple[str, list[int], torch.Tensor | None, list | None]:
    _, question, tiles, history_from = next(c for c in CASES if c[0] == name)
    pixels = b.pixels[name] if tiles else None
    history = None
    if history_from is not None:
        prev = b.cases[history_from]
        history = [(prev["question_recorded"], prev["text"])]
    return question, tiles, pixels, history


def _reference_case(
    b: Built, llm: ReferenceLLM | InternLM2Reference, name: str, max_new_tokens: int = MAX_NEW
) -> dict[str, Any]:
    question, tiles, pixels, history = _case_inputs(b, name)
    query = reference_query(b.template, question, tiles, b.num_image_token, history)
    ids = torch.tensor(b.tokenizer.encode(query))
    vit = extract_feature(b.state, b.config, pixels) if pixels is not None else None
    embeds = merge_image_embeds(llm, ids, None if vit is None else vit["vit_embeds"], b.img_context_id)
    result = llm.greedy(embeds, b.stop_id, max_new_tokens)
    recorded = (
        question if history is not None or not tiles or "<image>" in question else "<image>\n" + question
    )
    return {
        "query": query,
        "input_ids": ids,
        "vision": vit,
        "embeds": embeds,
        **result,
        "text": b.decode(result["ids"]),
        "question_recorded": recorded,
        "history": history,
    }


BATCH_QUESTIONS = ["<image>\nDescribe the image in detail.", "What is shown here?"]
BATCH_TILES = [2, 3]  # the two_images tiles, one image per question


def _reference_batch(b: Built, llm: ReferenceLLM | InternLM2Reference) -> list[dict[str, Any]]:
    """batch_chat(): per question its own query (``<image>\n`` prepended when missing), left-padded into one
    batch; valid positions equal the single-sample run, so each sample is decoded on its own here."""
    out = []
    for question, tiles in zip(BATCH_QUESTIONS, _split(b.pixels["two_images"], BATCH_TILES), strict=True):
        query = reference_query(b.template, question, [len(tiles)], b.num_image_token)
        ids = torch.tensor(b.tokenizer.encode(query))
        vit = extract_feature(b.state, b.config, tiles)["vit_embeds"]
        result = llm.greedy(merge_image_embeds(llm, ids, vit, b.img_context_id), b.stop_id, MAX_NEW)
        out.append({"query": query, "input_ids": ids, **result, "text": b.decode(result["ids"])})
    return out


def _split(pixels: torch.Tensor, tiles: list[int]) -> list[torch.Tensor]:
    return list(torch.split(pixels, tiles))


def _engineer(b: Built, llm: ReferenceLLM | InternLM2Reference) -> None:
    """Rewrite lm-head rows so greedy decoding of EVENT_CASE emits each event token exactly at its step.

    Least-squares rows: the token's logit sits 2 below the best other logit before its step, 2 above at it.
    """
    head = llm.head
    for step, token in sorted(b.events):
        case = _reference_case(b, llm, EVENT_CASE, max_new_tokens=step + 1)
        assert len(case["ids"]) == step + 1, f"generation stopped before step {step}"
        # keep the token out of the other prompts' answers (they should run to max_new_tokens)
        others = [_reference_case(b, llm, name)["hidden"] for name in ("text_only", "two_images")]
        hidden = torch.cat([case["hidden"], *others])  # event case rows first
        logits = hidden @ head.T
        logits[:, token] = -float("inf")
        best = logits.max(dim=-1).values
        target = best - 2.0
        target[step] = best[step] + 2.0
        row = torch.linalg.lstsq(hidden.double(), target.double()[:, None]).solution[:, 0]
        row = row.to(torch.bfloat16)
        b.state[llm.head_key][token] = row
        with torch.no_grad():
            head[token] = row.float()


def build(spec: Spec, folder: Path) -> Built:
    config, state = write_checkpoint(spec, folder)
    phi3, internlm2 = spec.llm == "phi3", spec.llm == "internlm2"
    tok = SlowLlamaTokenizerReference(
        str((GOLDEN_INTERNLM2 if internlm2 else GOLDEN) / "tokenizer.model"),
        added_tokens(spec),
        set(special_map_tokens(spec)) | {"<|endoftext|>"},  # + eos / pad
        add_bos=phi3 or internlm2,
        legacy=internlm2,
    )
    ids = {t: i for t, (i, _) in tok.added.items()}
    template = PHI3_CHAT if phi3 else HERMES_2  # internlm2-chat renders like Hermes-2 in chat()
    stop = ids[template["sep"]]
    if phi3 or internlm2:  # the LLM's eos mid-answer (no stop), <box>, then the separator
        events = [(1, ids["<|endoftext|>"] if phi3 else 2), (3, ids["<box>"]), (5, stop)]
    else:
        events = [(2, ids["<box>"]), (4, stop)]
    b = Built(spec, folder, config, state, tok, template, stop, events, ids["<IMG_CONTEXT>"])
    if phi3:  # LongRoPE: text_only's prompt uses short factors, its decode steps >= 4 cross into long ones
        text_len = len(tok.encode(reference_query(template, CASES[0][1], [], 4)))
        config["llm_config"]["original_max_position_embeddings"] = text_len + 3
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(spec.seed + 100)
    size = spec.image_size
    for name, _, tiles, _ in CASES:
        if tiles:
            b.pixels[name] = torch.randn(sum(tiles), 3, size, size, generator=gen)
    b.pixels["multi_turn"] = b.pixels["single_image"]
    llm = (InternLM2Reference if internlm2 else ReferenceLLM)(state, config["llm_config"])
    _engineer(b, llm)
    save_weights(state, folder)
    for name, *_ in CASES:
        b.cases[name] = _reference_case(b, llm, name)
    b.batch = _reference_batch(b, llm)
    got = b.cases[EVENT_CASE]["ids"]
    assert all(len(got) > s and got[s] == t for s, t in b.events), f"events not engineered: {got}"
    return b


@pytest.fixture(scope="module", params=SPECS, ids=[s.name for s in SPECS])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    torch.manual_seed(0)
    b = build(request.param, tmp_path_factory.mktemp(request.param.name))
    b.chat_model = load_chat_model(b.folder, device="cpu", dtype=torch.float32)
    return b


def only(predicate: Any) -> pytest.MarkDecorator:
    """Run a test on the specs it applies to (instead of skipping the others)."""
    specs = [spec for spec in SPECS if predicate(spec)]
    return pytest.mark.parametrize("built", specs, indirect=True, ids=[spec.name for spec in specs])


# ------------------------------------------------------------------------------------------------ tests


def test_reference_cases_are_meaningful(built: Built) -> None:
    """Greedy margins leave room for fp32 noise, and decoding does not stop early except on the stop token."""
    for name, case in built.cases.items():
        assert min(case["margins"]) > 1e-3, f"{name}: greedy margin too small for a fair comparison"
    assert (
        built.cases["text_only"]["ids"][-1] != built.stop_id
        and len(built.cases["text_only"]["ids"]) == MAX_NEW
    )
    assert built.cases[EVENT_CASE]["ids"][-1] == built.stop_id


def test_loads_every_weight(built: Built) -> None:
    """The loader raises on missing / unexpected weights; every checkpoint value also lands in the model."""
    model = built.chat_model.model
    n_model = sum(p.numel() for p in model.parameters())
    assert n_model == sum(t.numel() for t in built.state.values())
    assert built.chat_model.num_image_token == built.num_image_token


def test_vision_features(built: Built) -> None:
    """vit_embeds (InternViT, select_layer, pixel shuffle v1/v2, mlp1) match the reference."""
    for name in ("single_image", "two_images"):
        pixels = built.pixels[name]
        expected = built.cases[name]["vision"]["vit_embeds"]
        assert_close(built.chat_model.image_features(pixels), expected, VISION_TOL, f"{name} vit_embeds")


def test_pixel_shuffle_version_matters(built: Built) -> None:
    """Negative control: the other ps_version gives other tokens, so the feature check tells them apart."""
    config = {**built.config, "ps_version": "v2" if built.config["ps_version"] == "v1" else "v1"}
    other = extract_feature(built.state, config, built.pixels["single_image"])["vit_embeds"]
    assert (other - built.cases["single_image"]["vision"]["vit_embeds"]).abs().max() > 1e-2


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_prompt_and_token_ids(built: Built, case: str) -> None:
    """build_prompt equals chat()'s query; its ids equal the reference slow tokenizer's."""
    question, tiles, _, history = _case_inputs(built, case)
    expected = built.cases[case]
    assert built.chat_model.build_prompt(question, tiles or None, history) == expected["query"]
    ids = built.chat_model.encode([expected["query"]])["input_ids"][0]
    assert ids.tolist() == expected["input_ids"].tolist()


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_prefill_logits(built: Built, case: str) -> None:
    """Logits at every prompt position (the last one picks the first token) match the reference."""
    expected = built.cases[case]
    cm = built.chat_model
    ids = expected["input_ids"][None]
    pixels = built.pixels.get(case) if case != "text_only" else None
    with torch.inference_mode():
        out = cm.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=None if pixels is None else pixels.to(cm.dtype),
        )
    assert_close(out.logits[0], expected["prefill_logits"], LOGIT_TOL, f"{case} prefill logits")


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_greedy_chat(built: Built, case: str) -> None:
    """chat() generates the reference's ids and returns its text; stops only on the template separator."""
    question, tiles, pixels, history = _case_inputs(built, case)
    expected = built.cases[case]
    cm = built.chat_model
    ids = cm.generate_ids(
        [expected["query"]], pixels, generation_config=cm.generation_config(max_new_tokens=MAX_NEW)
    )
    assert ids[0] == expected["ids"]
    answer, hist = cm.chat(
        question,
        history=history,
        pixel_values=pixels,
        num_patches_list=tiles or None,
        max_new_tokens=MAX_NEW,
        return_history=True,
    )
    assert answer == expected["text"]
    assert list(hist[-1]) == [expected["question_recorded"], expected["text"]]


def test_stop_token_and_eos(built: Built) -> None:
    """Engineered case: the LLM's eos and <box> come mid-answer without stopping; the separator stops."""
    ids = built.cases[EVENT_CASE]["ids"]
    assert ids == ids[: built.events[-1][0] + 1] and ids[-1] == built.stop_id
    cm = built.chat_model
    assert cm.stop_token_id == built.stop_id
    pixels = built.pixels[EVENT_CASE]
    pieces = list(cm.stream(CASES[1][1], pixel_values=pixels, max_new_tokens=MAX_NEW))
    assert "".join(pieces) == built.cases[EVENT_CASE]["text"]


@only(lambda s: s.llm == "phi3" and s.rope_type is not None)
def test_longrope_matches_su_reference(built: Built) -> None:
    """Phi-3 ``su`` scaling: the model's rotary cos/sin equal Phi3SuScaledRotaryEmbedding's (short, long)."""
    llm_cfg = built.config["llm_config"]
    rotary = built.chat_model.model.model.language_model.rotary_emb
    reference = SuScaledRotary(llm_cfg)
    x = torch.zeros(1, 1, 8)
    orig = llm_cfg["original_max_position_embeddings"]
    for positions in (torch.arange(orig)[None], torch.arange(orig + 5)[None], torch.tensor([[orig + 9]])):
        cos, sin = rotary(x, positions)
        rcos, rsin = reference(x, positions)
        assert_close(cos, rcos, 1e-6, f"cos at {positions.max().item()}")
        assert_close(sin, rsin, 1e-6, f"sin at {positions.max().item()}")


@only(lambda s: s.llm == "phi3" and s.rope_type is not None)
def test_longrope_boundary_is_exercised(built: Built) -> None:
    """Negative control: with short factors only, text_only's decode steps past the boundary change."""
    llm = ReferenceLLM(built.state, built.config["llm_config"])
    rotary = llm.model.model.rotary_emb
    rotary.long = rotary.short
    case = built.cases["text_only"]
    short_only = llm.greedy(case["embeds"], built.stop_id, MAX_NEW)
    assert short_only["ids"][:4] == case["ids"][:4]
    diff = (short_only["step_logits"] - case["step_logits"]).abs().amax(dim=-1)
    assert diff[:4].max() < 1e-4 and diff[4:].min() > 1e-2


@only(lambda s: s.sliding_window is not None)
def test_sliding_window_is_exercised(built: Built) -> None:
    """Negative control: without the window the reference logits change, so the window is really tested."""
    llm = ReferenceLLM(built.state, built.config["llm_config"])
    llm.sliding_window = None
    case = built.cases["single_image"]
    full = llm.greedy(case["embeds"], built.stop_id, 1)
    assert (full["prefill_logits"] - case["prefill_logits"]).abs().max() > 1e-2


@only(lambda s: s.name == "phi3")
def test_missing_or_unexpected_weight_is_an_error(built: Built, tmp_path: Path) -> None:
    """A checkpoint with a tensor dropped, or an unknown tensor added, is refused with a clear error."""
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(built.folder / "model.safetensors")
    for name, change in (
        ("missing", lambda s: s.pop("language_model.model.layers.0.mlp.gate_up_proj.weight")),
        ("unexpected", lambda s: s.__setitem__("vision_model.extra.weight", torch.ones(2))),
    ):
        folder = tmp_path / name
        shutil.copytree(built.folder, folder)
        broken = dict(state)
        change(broken)
        save_file(broken, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match="gate_up_proj" if name == "missing" else "extra"):
            load_chat_model(folder, device="cpu", dtype=torch.float32)


PHI3_TOKEN_VARIANTS = [
    pytest.param(True, id="phi3_tokens_in_special_map"),
    pytest.param(False, id="phi3_tokens_plain"),
]


@functools.lru_cache(maxsize=2)
def _phi3_tokenizers(in_special_map: bool) -> tuple[Any, SlowLlamaTokenizerReference]:
    from chat.prompt import load_tokenizer

    spec = Spec(name="tok", llm="phi3", template="phi3-chat", phi3_tokens_in_special_map=in_special_map)
    with tempfile.TemporaryDirectory(prefix="phi3_tokenizer_") as tmp:
        write_checkpoint(spec, Path(tmp))
        tokenizer = load_tokenizer(Path(tmp))
    special = set(special_map_tokens(spec)) | {"<|endoftext|>"}
    reference = SlowLlamaTokenizerReference(
        str(GOLDEN / "tokenizer.model"), added_tokens(spec), special, add_bos=True
    )
    return tokenizer, reference


@pytest.mark.parametrize("in_special_map", PHI3_TOKEN_VARIANTS)
def test_phi3_answer_decoding_matches_slow_reference(in_special_map: bool) -> None:
    """chat()'s answer text: ``decode(skip_special_tokens=True).split('<|end|>')[0].strip()`` as in 4.37."""
    from chat.generation import AnswerDecoder
    from chat.templates import get_template

    tokenizer, reference = _phi3_tokenizers(in_special_map)
    template = get_template("phi3-chat")
    decode = AnswerDecoder(tokenizer)
    the, what = reference.sp.piece_to_id("▁The"), reference.sp.piece_to_id("▁What")
    for ids in ([the, 32000, what, 32018, the, 32007], [the, 32010, what, 32001, the, 32007], [32002, the]):
        expected = reference.decode(ids).split("<|end|>")[0].strip()
        assert template.postprocess(decode(ids)) == expected


@pytest.mark.parametrize("in_special_map", PHI3_TOKEN_VARIANTS)
def test_phi3_tokenizer_matches_slow_reference(in_special_map: bool) -> None:
    """Prompt ids of a phi3-chat folder equal transformers 4.37's slow LlamaTokenizer (what chat() used).

    Phi-3's role tokens eat the whitespace after them (``rstrip``). When they are added tokens but not in
    ``additional_special_tokens``, the slow tokenizer keeps the ``"▁"`` (29871) it prepends to a prompt that
    starts with ``<|system|>``.
    """
    from chat.prompt import tokenize_batch

    tokenizer, reference = _phi3_tokenizers(in_special_map)
    history = [("<image>\nPlease describe the image shortly.", "A cat.")]
    for question, tiles, hist in [(c[1], c[2], None) for c in CASES] + [("And now?", [1], history)]:
        query = reference_query(PHI3_CHAT, question, tiles, 4, hist)
        got = tokenize_batch(tokenizer, [query])["input_ids"][0].tolist()
        assert got == reference.encode(query), f"ids differ for {question!r}"


def test_phi3_yarn_rope_matches_reference(tmp_path: Path) -> None:
    """Phi-3 ``rope_scaling.type: yarn`` (the reference's Phi3YarnScaledRotaryEmbedding), short and long."""
    spec = Spec(name="yarn", llm="phi3", template="phi3-chat", rope_type="yarn")
    config, state = write_checkpoint(spec, tmp_path)
    save_weights(state, tmp_path)
    model = load_chat_model(tmp_path, device="cpu", dtype=torch.float32).model
    rotary = model.model.language_model.rotary_emb
    reference = SuScaledRotary(config["llm_config"])
    x = torch.zeros(1, 1, 8)
    for positions in (torch.arange(20)[None], torch.arange(200)[None]):
        for got, want in zip(rotary(x, positions), reference(x, positions), strict=True):
            assert_close(got, want, 1e-6, f"yarn rope up to {positions.max().item()}")


def test_batch_chat(built: Built) -> None:
    """batch_chat(): one image per question in a left-padded batch; ids and texts equal single-sample runs."""
    cm = built.chat_model
    pixels = built.pixels["two_images"]
    config = cm.generation_config(max_new_tokens=MAX_NEW)
    queries = [sample["query"] for sample in built.batch]
    assert cm.generate_ids(queries, pixels, generation_config=config) == [s["ids"] for s in built.batch]
    answers = cm.batch_chat(BATCH_QUESTIONS, pixels, BATCH_TILES, max_new_tokens=MAX_NEW)
    assert answers == [sample["text"] for sample in built.batch]
