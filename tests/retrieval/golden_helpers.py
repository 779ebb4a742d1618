"""Encoder test helpers: reading the InternVL-C/G golden fixtures and the tolerance check."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
#: every InternVL-C/G golden fixture present (a second one with other sizes can be dropped in)
#: (more folders can be named in IVL_CG_FIXTURES, separated by os.pathsep)
_EXTRA = [Path(p) for p in os.environ.get("IVL_CG_FIXTURES", "").split(os.pathsep) if p]
CG_FIXTURES = sorted(
    {
        p.resolve()
        for p in [*FIXTURES.glob("internvl_cg_*"), *_EXTRA]
        if (p / "expected.safetensors").is_file()
    }
)
TINY = FIXTURES / "internvl_cg_tiny"


@dataclass
class Golden:
    """One golden fixture: folder, expected tensors, image files (batch order) and texts."""

    dir: Path
    expected: dict[str, torch.Tensor]
    image_files: list[Path]
    texts: list[str]


def load_golden(folder: Path) -> Golden:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    texts = json.loads((folder / manifest.get("texts_file", "texts.json")).read_text(encoding="utf-8"))
    images = [folder / "images" / name for name in manifest["images"]]
    return Golden(folder, load_file(str(folder / "expected.safetensors")), images, texts)


def rel_deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the fixture README's per-tensor measure)."""
    actual = torch.as_tensor(actual).float()
    return float((actual - expected).abs().max() / expected.abs().max())


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """The fixture's recommended check: rtol 1e-4, atol 1e-4 * max|expected| (per tensor)."""
    actual = torch.as_tensor(actual).float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=lambda m: f"{name}: {m}"
    )
