"""InternVL-G captions against the official ``InternVLModel.generate`` (``captions.json`` of each fixture):
every greedy and beam-search sequence token for token, first-step logits within 1e-4 relative, texts through
``encoder.caption`` from the image files; plus sampling, batching and the backends that cannot caption."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from golden_helpers import CG_FIXTURES, load_golden
from PIL import Image
from safetensors.torch import load_file, save_file

from retrieval import load_encoder
from retrieval.errors import CaptioningNotSupportedError
from retrieval.internvl.captioning import caption_attention_mask
from retrieval.internvl.encoder import InternVLEncoder, load_internvl_encoder

CAPTION_FIXTURES = [p for p in CG_FIXTURES if (p / "captions.json").is_file()]
MODES = ["internvl-c", "internvl-g"]


def _cases(folder: Path) -> list[dict]:
    return json.loads((folder / "captions.json").read_text(encoding="utf-8"))["cases"]


CASES = [(folder, i) for folder in CAPTION_FIXTURES for i in range(len(_cases(folder)))]


@pytest.fixture(scope="module", params=MODES)
def encoders(request: pytest.FixtureRequest) -> dict[Path, InternVLEncoder]:
    """One encoder per captions fixture, in each mode (captioning must not depend on the mode)."""
    return {f: load_internvl_encoder(f, mode=request.param, device="cpu") for f in CAPTION_FIXTURES}


def _image_files(folder: Path) -> list[Path]:
    return load_golden(folder).image_files


def _call_kwargs(case: dict) -> dict:
    """The case's generate kwargs; ``min_new_tokens`` 0 where the reference call left transformers' default
    (``caption`` itself defaults to 8, as the README example)."""
    return {"min_new_tokens": 0, **case["generate_kwargs"]}


def test_fixture_present() -> None:
    assert CAPTION_FIXTURES, "tests/fixtures/internvl_cg_tiny/captions.json is missing"


@pytest.mark.parametrize("folder", CAPTION_FIXTURES, ids=lambda p: p.name)
def test_transform_reproduces_reference_pixels(folder: Path, encoders: dict[Path, InternVLEncoder]) -> None:
    golden = load_golden(folder)
    encoder = encoders[folder]
    pixels = torch.stack([encoder.preprocess(f) for f in golden.image_files])
    torch.testing.assert_close(pixels, golden.expected["pixel_values_retrieval"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("folder", CAPTION_FIXTURES, ids=lambda p: p.name)
def test_prompt_ids(folder: Path, encoders: dict[Path, InternVLEncoder]) -> None:
    tokenizer = encoders[folder].tokenizer
    for case in _cases(folder):
        assert tokenizer.encode_prompt(case["prompt"]) == case["prompt_ids"]


@pytest.mark.parametrize(("folder", "index"), CASES, ids=[f"{f.name}-case{i}" for f, i in CASES])
def test_reference_case(folder: Path, index: int, encoders: dict[Path, InternVLEncoder]) -> None:
    case = _cases(folder)[index]
    expected = load_file(folder / "captions.safetensors")
    encoder, files = encoders[folder], _image_files(folder)
    kwargs = _call_kwargs(case)
    out = encoder.generate_captions(files, case["prompt"], output_logits=True, output_scores=True, **kwargs)

    # every sequence token for token, BOS first as the reference returns them
    assert out.sequences.tolist() == case["sequences"]
    assert out.sequences.tolist() == expected[f"case{index}_sequences"].tolist()

    # first-step logits (one row per image: every beam of an image starts from the same prefill)
    beams = kwargs.get("num_beams", 1)
    first = out.logits[0][::beams]
    want = expected[f"case{index}_first_step_logits"]
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if beams > 1:
        want_scores = expected[f"case{index}_sequences_scores"]
        torch.testing.assert_close(out.sequences_scores, want_scores, rtol=1e-4, atol=1e-4)

    # the user API: texts from the image files
    assert encoder.caption(files, case["prompt"], **kwargs) == case["texts"]


def test_caption_defaults_are_the_readme_call(encoders: dict[Path, InternVLEncoder]) -> None:
    """``caption(images)`` = ``generate(num_beams=5, min_new_tokens=8, max_new_tokens=30)`` with the
    "English caption:" prompt; the beam-5 reference case is a prefix-compatible check of it."""
    for folder in CAPTION_FIXTURES:
        case = next(c for c in _cases(folder) if c["setting"] == "beam5")
        assert case["prompt"] == "English caption:"
        encoder = encoders[folder]
        out = encoder.generate_captions(_image_files(folder))
        assert out.sequences.shape[1] == 1 + 30
        max_new = case["generate_kwargs"]["max_new_tokens"]
        assert encoder.caption(_image_files(folder), max_new_tokens=max_new) == case["texts"]


def test_sampling_with_a_seed_is_deterministic(encoders: dict[Path, InternVLEncoder]) -> None:
    folder = CAPTION_FIXTURES[0]
    encoder, files = encoders[folder], _image_files(folder)
    kwargs = dict(num_beams=1, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=10)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(encoder.generate_captions(files, **kwargs).sequences)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the seed matters: it really samples
    greedy = encoder.generate_captions(files, num_beams=1, max_new_tokens=10).sequences
    assert not torch.equal(runs[0], greedy)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_equals_single(num_beams: int, encoders: dict[Path, InternVLEncoder]) -> None:
    folder = CAPTION_FIXTURES[0]
    encoder = encoders[folder]
    images = [Image.open(f) for f in _image_files(folder)]  # PIL images, any mode
    batch = encoder.caption(images, num_beams=num_beams, max_new_tokens=12)
    single = [encoder.caption([im], num_beams=num_beams, max_new_tokens=12)[0] for im in images]
    assert batch == single
    assert len(set(batch)) > 1  # the captions depend on the image


def test_input_checks(encoders: dict[Path, InternVLEncoder]) -> None:
    folder = CAPTION_FIXTURES[0]
    encoder, files = encoders[folder], _image_files(folder)
    assert encoder.caption([]) == []
    with pytest.raises(TypeError, match="sequence of images"):
        encoder.caption(str(files[0]))
    with pytest.raises(TypeError, match="prompt"):
        encoder.caption(files[:1], prompt=None)  # type: ignore[arg-type]


def test_checkpoint_names_and_strict_loading_unchanged(encoders: dict[Path, InternVLEncoder]) -> None:
    """The generate wrapper shares the model's ``qllama`` (no copy) and adds no parameter to it."""
    for folder, encoder in encoders.items():
        encoder.caption(_image_files(folder)[:1], max_new_tokens=2)
        stored = set(load_file(folder / "model.safetensors"))
        assert set(encoder.model.state_dict()) == stored
        lm = encoder.captioner.lm
        assert lm.qllama is encoder.model.qllama
        assert {f"qllama.{k}" for k, _ in encoder.model.qllama.named_parameters()} == {
            k for k, _ in lm.named_parameters()
        }
        load_internvl_encoder(folder, device="cpu")  # strict load still succeeds


def test_attention_mask_traps() -> None:
    """First step: causal except the all-visible query block; cached steps: every key visible."""
    mask = caption_attention_mask(new=5, past=0, num_query_token=3, key_mask=None, device=torch.device("cpu"))
    assert mask is not None
    m = mask[0, 0]
    assert m[:3, :3].all()  # queries see each other bidirectionally
    assert not m[:3, 3:].any()  # ... but not the prompt after them
    assert torch.equal(m[3:], torch.ones(5, 5, dtype=torch.bool).tril()[3:])  # prompt positions: causal
    assert caption_attention_mask(1, 5, 3, torch.ones(2, 6), torch.device("cpu")) is None
    padded = torch.tensor([[0, 1, 1, 1, 1, 1]])
    step = caption_attention_mask(1, 5, 3, padded, torch.device("cpu"))
    assert step is not None and step[0, 0, 0].tolist() == [False] + [True] * 5


def test_cached_steps_do_not_cross_attend(encoders: dict[Path, InternVLEncoder]) -> None:
    """A one-token step over the cache gives the same logits with or without the vision tokens."""
    from transformers import DynamicCache

    folder = CAPTION_FIXTURES[0]
    encoder = encoders[folder]
    captioner = encoder.captioner
    pixels = torch.stack([encoder.preprocess(f) for f in _image_files(folder)[:2]])
    with torch.inference_mode():
        vision = encoder.model.vision_tokens(pixels)
        embeds = captioner.prompt_embeds("English caption:", 2)
        results = []
        for with_vision in (True, False):
            cache = DynamicCache(config=captioner.lm.config)
            first = captioner.lm(inputs_embeds=embeds, vision_hidden_states=vision, cache=cache)
            token = first.logits[:, -1].argmax(-1, keepdim=True)
            step = captioner.lm(
                input_ids=token, vision_hidden_states=vision if with_vision else None, cache=cache
            )
            results.append((first.logits, step.logits))
        # the prefill does depend on the image: without cross-attention the first logits differ
        no_vision = captioner.lm(inputs_embeds=embeds, cache=DynamicCache(config=captioner.lm.config))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert not torch.allclose(results[0][0][:, -1], no_vision.logits[:, -1], atol=1e-3)


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("caption_openclip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def test_openclip_cannot_caption(openclip_dir: Path) -> None:
    encoder = load_encoder(openclip_dir, device="cpu")
    with pytest.raises(CaptioningNotSupportedError, match="cannot caption"):
        encoder.caption([Image.new("RGB", (32, 32))])
    with pytest.raises(CaptioningNotSupportedError, match="cannot caption"):
        encoder.caption_pixels(torch.zeros(1, 3, 32, 32))


def test_caption_pixels_equals_caption(encoders: dict[Path, InternVLEncoder]) -> None:
    folder = CAPTION_FIXTURES[0]
    encoder, files = encoders[folder], _image_files(folder)
    pixels = torch.stack([encoder.image_transform(Image.open(f)) for f in files])
    assert encoder.caption_pixels(pixels, max_new_tokens=6) == encoder.caption(files, max_new_tokens=6)
    assert encoder.caption_pixels(pixels[:0]) == []
