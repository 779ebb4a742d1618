"""Shared fixtures of the encoder tests: each InternVL-C/G golden fixture and its loaded model."""

from __future__ import annotations

import pytest
import torch
from golden_helpers import CG_FIXTURES, Golden, load_golden

from retrieval.internvl import InternVLModel


@pytest.fixture(scope="session", params=CG_FIXTURES, ids=[p.name for p in CG_FIXTURES])
def golden(request: pytest.FixtureRequest) -> Golden:
    return load_golden(request.param)


@pytest.fixture(scope="session")
def golden_model(golden: Golden) -> InternVLModel:
    return InternVLModel.from_pretrained(golden.dir, device="cpu", dtype=torch.float32)
