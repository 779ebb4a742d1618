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


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CG_FIXTURE = FIXTURES / "internvl_cg_tiny"
CHAT_FIXTURE = FIXTURES / "internvl_chat_tiny"


@pytest.fixture(scope="session")
def real_encoder():
    """The tiny InternVL-C fixture model, loaded once."""
    from retrieval import load_encoder

    return load_encoder(str(CG_FIXTURE))


@pytest.fixture(scope="session")
def chat_model():
    """The tiny InternVL-Chat fixture model, loaded once."""
    from chat import load_chat_model

    return load_chat_model(str(CHAT_FIXTURE))


@pytest.fixture(scope="session")
def real_image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real_photos")
    make_images(root, n=5, size=(48, 40))
    for src in sorted((CG_FIXTURE / "images").iterdir()):
        (root / src.name).write_bytes(src.read_bytes())
    return root


@pytest.fixture(scope="session")
def real_index_dir(tmp_path_factory: pytest.TempPathFactory, real_image_root: Path, real_encoder) -> Path:  # noqa: ANN001
    index_dir = tmp_path_factory.mktemp("real_index")
    paths = sorted(p for p in real_image_root.iterdir() if p.is_file())
    build_index(index_dir, real_encoder, paths, root=real_image_root).close()
    return index_dir


@pytest.fixture(scope="session")
def real_url(real_index_dir: Path, real_encoder, chat_model):  # noqa: ANN001
    """A real server: fixture encoder, fixture chat model, small real index (limits lowered for tests)."""
    from api_helpers import serve

    from api.app import create_app
    from api.settings import Settings

    settings = Settings(index=str(real_index_dir), max_pixels=1_000_000, reload_interval_s=0.5)
    with serve(create_app(settings, encoder=real_encoder, chat_model=chat_model)) as base:
        yield base
