"""train_demo_chat.py / chat_shapes.py: deterministic samples, answer-only labels, a checkpoint that
load_chat_model reads back to the same model (original layout, float16)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import chat_shapes as cs
import pytest
import torch
import train_demo_chat as tdc
from safetensors.torch import load_file

from chat.convert import convert_state_dict, original_state_dict
from chat.loader import load_chat_model, read_safetensors

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "internvl_chat_qwen2_tiny"


def test_samples_are_deterministic_and_answer_in_language() -> None:
    a = cs.make_samples(21, 5)
    b = cs.make_samples(7, 5, start=14)
    assert [(s.question, s.answer) for s in a[14:]] == [(s.question, s.answer) for s in b]
    for s in a:
        assert s.question.count("<image>") == len(s.images) >= 1
    rng = random.Random(3)
    which = cs.make_sample("which", "zh", rng)
    assert which.question.startswith("Image-1: <image>\n") and which.answer.startswith("Image-")
    assert cs.answer_text("colour", "zh", colour="green") == "绿色"
    assert cs.answer_text("yesno", "fr", yes=False) == "Non"
    assert cs.question_text("colour", "en", random.Random(0), "heart").endswith("the heart?")


def test_which_image_has_exactly_one_match() -> None:
    for i in range(20):
        s = cs.make_sample("which", "en", random.Random(i))
        n = s.question.count("<image>")
        assert 1 <= int(s.answer.split("-")[1]) <= n


def test_original_state_dict_inverts_the_conversion() -> None:
    config = json.loads((FIXTURE / "config.json").read_text())
    stored = read_safetensors(FIXTURE)
    back = original_state_dict(convert_state_dict(stored, config), config)
    assert sorted(back) == sorted(stored)
    assert all(torch.equal(back[k], stored[k]) for k in stored)


def test_labels_cover_the_answer_only() -> None:
    tokenizer = tdc.load_tokenizer(tdc.TOKENIZER_DIR)
    sample = cs.make_sample("colour", "en", random.Random(1))
    (row,) = tdc.encode_samples([sample], tokenizer, 16)
    batch = tdc.collate([row], pad_id=0)
    targets = batch["target"][0][batch["target"][0] != -100].tolist()
    assert tokenizer.decode(targets[:-1]).strip() == sample.answer
    assert targets[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo_chat") / "model"
    argv = ["--out", str(out), "--samples", "24", "--steps", "3", "--batch-size", "8", "--warmup", "1",
            "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--mlp", "64",
            "--workers", "1", "--align-layer", "1"]  # fmt: skip
    return {"out": out, **tdc.main(argv)}


def test_checkpoint_loads_back_as_the_trained_model(tiny_run: dict) -> None:
    out = tiny_run["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and "language_model.lm_head.weight" not in load_file(
        out / "model.safetensors"
    )
    loaded = load_chat_model(out, device="cpu", dtype=torch.float16)
    trained = {k: v.to(torch.float16) for k, v in tiny_run["model"].state_dict().items()}
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    log = json.loads((out / "training.json").read_text())
    assert log["steps_done"] == 3 and set(log["sha256"]) >= {"config.json", "model.safetensors"}
    sample = cs.make_sample("shape", "en", random.Random(0))
    assert isinstance(loaded.chat(sample.question, images=sample.images, max_new_tokens=3), str)


TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--mlp", "64", "--workers", "1",
        "--batch-size", "8", "--warmup", "1", "--align-layer", "1"]  # fmt: skip


def test_curriculum_holds_back_the_late_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    collate = tdc.collate

    def recording(batch: list[dict], pad_id: int) -> dict:
        seen.append([b["kind"] for b in batch])
        return collate(batch, pad_id)

    monkeypatch.setattr(tdc, "collate", recording)
    tdc.main(["--out", str(tmp_path / "m"), "--samples", "64", "--steps", "6", "--curriculum", "3",
              "--late-kinds", "yesno,which", *TINY])  # fmt: skip
    assert len(seen) == 6
    assert not {"yesno", "which"} & {k for b in seen[:3] for k in b}


def test_init_from_starts_from_the_given_model(tiny_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "again"
    tdc.main(["--out", str(out), "--samples", "16", "--steps", "1", "--lr", "0", "--vision-lr", "0",
              "--init-from", str(tiny_run["out"]), *TINY])  # fmt: skip
    a, b = load_file(out / "model.safetensors"), load_file(tiny_run["out"] / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grounding_pairs_name_each_image_and_the_asked_object() -> None:
    tokenizer = tdc.load_tokenizer(tdc.TOKENIZER_DIR)
    words, digits = tdc.grounding_targets(tokenizer)
    samples = (cs.make_sample("which", "zh", random.Random(i)) for i in range(50))
    sample = next(s for s in samples if len(s.images) == 3)
    (row,) = tdc.encode_samples([sample], tokenizer, 16)
    ids, n_prompt = row["ids"], row["n_prompt"]
    end_img = tokenizer.convert_tokens_to_ids("</img>")
    ends = [j for j, t in enumerate(ids) if t == end_img]
    by_pos: dict[int, set[int]] = {}
    for j, t in row["ground"]:
        by_pos.setdefault(j, set()).add(t)
    for k, (j, (shape, colour)) in enumerate(zip(ends, sample.objects, strict=True)):
        assert by_pos[j] == {words[shape], words[colour], digits[k + 1]}
    asked = {words[sample.asked[0]], words[sample.asked[1]]}
    answer_positions = set(range(n_prompt - 1, len(ids) - 1))
    assert {j for j in by_pos if j not in ends} == answer_positions
    assert all(by_pos[j] == asked for j in answer_positions)
    digit = ids[n_prompt + 2]  # "▁Image", "-", digit
    assert digit == digits[int(sample.answer.split("-")[1])]
    assert sample.objects[int(sample.answer.split("-")[1]) - 1] == sample.asked


def test_grounding_skips_count_scenes_and_survives_rendering() -> None:
    weights = {k: float(k in ("count", "yesno")) for k in cs.KINDS}
    rendered = tdc.render_samples(40, 3, weights, workers=1)
    direct = cs.make_samples(40, 3, weights=weights)
    assert [(s.objects, s.asked) for s in rendered] == [(s.objects, s.asked) for s in direct]
    tokenizer = tdc.load_tokenizer(tdc.TOKENIZER_DIR)
    rows = tdc.encode_samples(rendered, tokenizer, 16)
    for s, row in zip(rendered, rows, strict=True):
        if s.kind == "count":
            assert s.objects == [None] and s.asked is None and row["ground"] == []
        else:
            assert s.asked is not None and len(row["ground"]) >= 4


def test_align_zero_trains_on_answers_only(tmp_path: Path) -> None:
    on = tdc.main(["--out", str(tmp_path / "a"), "--samples", "16", "--steps", "2", *TINY])
    off = tdc.main(["--out", str(tmp_path / "b"), "--samples", "16", "--steps", "2", "--align", "0", *TINY])
    assert on["log"]["history"][-1]["grounding"] > 0
    assert off["log"]["history"][-1]["grounding"] == 0
    with pytest.raises(SystemExit, match="align-layer"):
        tdc.main(["--out", str(tmp_path / "c"), "--samples", "8", "--steps", "1", *TINY, "--align-layer", "3"
                  ])  # fmt: skip
