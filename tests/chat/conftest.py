"""Shared fixtures for the chat tests: the three golden InternVL-Chat fixtures, loaded once per session."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chat import ChatModel, load_chat_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHAT_FIXTURES = ["internvl_chat_tiny", "internvl_chat_internlm2_tiny", "internvl_chat_qwen2_tiny"]
IMAGE_KEYS = ["wide", "tall", "tiny", "rgba"]

VISION_ATOL = VISION_RTOL = 1e-5  # fixture READMEs: |a - e| <= 1e-5 + 1e-5 |e|
LOGIT_ATOL = LOGIT_RTOL = 1e-4  # fixture READMEs: |a - e| <= 1e-4 + 1e-4 |e|


@dataclass
class GoldenChat:
    """One golden fixture: its folder, prompts.json, expected tensors, stored tiles and the loaded model."""

    name: str
    path: Path
    prompts: dict
    expected: dict[str, torch.Tensor]
    tiles: dict[str, torch.Tensor]
    model: ChatModel
    cases: dict[str, dict] = field(default_factory=dict)

    def pixel_values(self, images: list[str]) -> torch.Tensor | None:
        """Stored reference tiles of ``images``, concatenated in order (None for text-only cases)."""
        if not images:
            return None
        return torch.cat([self.tiles[f"pixel_values.{key}"] for key in images])

    def check_vision(self, actual: torch.Tensor, key: str) -> float:
        """Vision tensor vs ``expected[key]`` within the README tolerance; returns the worst deviation."""
        return assert_close(actual, self.expected[key], VISION_ATOL, VISION_RTOL, f"{self.name} {key}")

    def check_logits(self, actual: torch.Tensor, key: str) -> float:
        """Logit / logsumexp tensor vs ``expected[key]`` within the README tolerance."""
        return assert_close(actual, self.expected[key], LOGIT_ATOL, LOGIT_RTOL, f"{self.name} {key}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> float:
    """``|a - e| <= atol + rtol |e|`` elementwise; returns the worst absolute deviation."""
    actual = actual.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return 0.0
    diff = (actual - expected).abs()
    worst = diff.max().item()
    assert bool((diff <= atol + rtol * expected.abs()).all()), (
        f"{what}: max |diff| {worst:.3g} over tolerance"
    )
    return worst


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest (and bit-reproducibly) on one thread, especially on a shared busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def load_golden(name: str) -> GoldenChat:
    """A golden fixture with its model loaded in fp32 on CPU (the precision the fixtures were made in)."""
    path = FIXTURES / name
    prompts = json.loads((path / "prompts.json").read_text(encoding="utf-8"))
    model = load_chat_model(path, device="cpu", dtype=torch.float32)
    return GoldenChat(
        name=name,
        path=path,
        prompts=prompts,
        expected=load_file(path / "expected.safetensors"),
        tiles=load_file(path / "tiles.safetensors"),
        model=model,
        cases={case["name"]: case for case in prompts["cases"]},
    )


@pytest.fixture(scope="session", params=CHAT_FIXTURES)
def golden(request: pytest.FixtureRequest) -> GoldenChat:
    """Each of the three golden fixtures, loaded once per session."""
    return load_golden(request.param)


@pytest.fixture(scope="session")
def golden_qwen2() -> GoldenChat:
    """The Qwen2 / Hermes-2 fixture only (InternVL2-1B style; its video/ cases)."""
    return load_golden("internvl_chat_qwen2_tiny")


@pytest.fixture(scope="session")
def golden_tiny() -> GoldenChat:
    """The LLaMA / Hermes-2 fixture only (for tests that need one model, not all three)."""
    return load_golden("internvl_chat_tiny")
