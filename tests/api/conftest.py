"""Fixtures: a small real index of generated images, the fake encoder, running servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_helpers import FakeEncoder, build_index, make_images


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    make_images(root, n=6)
    return root


@pytest.fixture(scope="module")
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture(scope="module")
def fake_index_dir(
    tmp_path_factory: pytest.TempPathFactory, image_root: Path, fake_encoder: FakeEncoder
) -> Path:
    index_dir = tmp_path_factory.mktemp("index")
    build_index(index_dir, fake_encoder, sorted(image_root.glob("*.png")), root=image_root).close()
    return index_dir
