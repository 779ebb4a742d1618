"""Grounded answers with a fake index and encoder and the tiny LLaMA chat fixture."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chat import grounded


class FakeEncoder:
    """Returns a fixed unit vector for every text and records what it was asked."""

    name, embed_dim, mode = "fake", 4, "fake"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode_texts(self, texts, batch_size: int = 64) -> np.ndarray:
        self.calls.append(list(texts))
        return np.tile(np.array([1.0, 0, 0, 0], dtype=np.float32), (len(texts), 1))


class FakeIndex:
    """``index.search`` over a fixed list of rows (best first)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.searches: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries: np.ndarray, k: int):
        assert queries.shape == (1, 4) and queries.dtype == np.float32
        self.searches.append(k)
        hits = self.rows[:k]
        ids = np.array([[r["id"] for r in hits]])
        scores = np.array([[r["score"] for r in hits]], dtype=np.float32)
        return ids, scores, [hits]


class SpyChat:
    """Wraps the real ChatModel and records the arguments of chat()/stream()."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[tuple[str, dict]] = []

    def tile_images(self, images, max_num_tiles=None):
        return self.model.tile_images(images, max_num_tiles)

    def chat(self, question, **kwargs):
        self.calls.append((question, kwargs))
        return self.model.chat(question, **kwargs)

    def stream(self, question, **kwargs):
        self.calls.append((question, kwargs))
        return self.model.stream(question, **kwargs)


@pytest.fixture
def tiny(golden_tiny):
    return golden_tiny


def _rows(folder: Path, broken: Path | None = None) -> list[dict]:
    rows = [
        {"id": 11, "path": str(folder / "images" / "wide.png"), "score": 0.9},
        {"id": 12, "path": str(folder / "images" / "tiny.png"), "score": 0.8},
        {"id": 13, "path": str(folder / "images" / "rgba.png"), "score": 0.7},
    ]
    if broken is not None:
        rows.insert(1, {"id": 99, "path": str(broken), "score": 0.85})
    return rows


def test_answer_uses_top_k_images_in_order(tiny) -> None:
    index, encoder, spy = FakeIndex(_rows(tiny.path)), FakeEncoder(), SpyChat(tiny.model)
    out = grounded.answer(
        "What is shown?", index=index, encoder=encoder, chat_model=spy, k=2, max_new_tokens=4, max_num_tiles=2
    )
    assert encoder.calls == [["What is shown?"]] and index.searches == [2]
    assert [s["id"] for s in out["sources"]] == [11, 12]
    assert out["sources"][0] == {
        "id": 11,
        "path": str(tiny.path / "images" / "wide.png"),
        "score": pytest.approx(0.9),
    }
    question, kwargs = spy.calls[0]
    assert question == "Image-1: <image>\nImage-2: <image>\nWhat is shown?"
    assert kwargs["num_patches_list"] == [3, 3]  # wide 2x1 + thumbnail, tiny 1x2 + thumbnail at max 2 tiles
    assert kwargs["do_sample"] is False
    # same answer as calling chat directly with those images
    direct = tiny.model.chat(
        question,
        images=[Image.open(tiny.path / "images" / f"{k}.png") for k in ("wide", "tiny")],
        max_num_tiles=2,
        max_new_tokens=4,
    )
    assert out["answer"] == direct


def test_unreadable_images_are_skipped_with_warning(tiny, tmp_path: Path, caplog) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    index = FakeIndex(_rows(tiny.path, broken))
    with caplog.at_level(logging.WARNING, logger="chat.grounded"):
        out = grounded.answer(
            "Describe.",
            index=index,
            encoder=FakeEncoder(),
            chat_model=tiny.model,
            k=3,
            max_new_tokens=2,
            max_num_tiles=1,
        )
    assert [s["id"] for s in out["sources"]] == [11, 12]
    assert "broken.png" in caplog.text and "1 of 3" in caplog.text


def test_stream_answer_matches_answer(tiny) -> None:
    kwargs = dict(
        index=FakeIndex(_rows(tiny.path)),
        encoder=FakeEncoder(),
        chat_model=tiny.model,
        k=3,
        max_new_tokens=6,
        max_num_tiles=2,
    )
    sources, pieces = grounded.stream_answer("What do you see?", **kwargs)
    assert [s["id"] for s in sources] == [11, 12, 13]
    assert "".join(pieces) == grounded.answer("What do you see?", **kwargs)["answer"]


def test_history_placeholders_are_not_reused(tiny) -> None:
    spy = SpyChat(tiny.model)
    history = [("Image-1: <image>\nWhat is this?", "A wide picture.")]
    grounded.answer(
        "And now?",
        index=FakeIndex(_rows(tiny.path)),
        encoder=FakeEncoder(),
        chat_model=spy,
        k=1,
        history=history,
        max_new_tokens=2,
        max_num_tiles=1,
    )
    question, kwargs = spy.calls[0]
    assert question == "Image-1: <image>\nAnd now?"
    assert kwargs["history"] == [("What is this?", "A wide picture.")]
    assert history == [("Image-1: <image>\nWhat is this?", "A wide picture.")]


def test_empty_index_answers_without_images(tiny) -> None:
    spy = SpyChat(tiny.model)
    out = grounded.answer(
        "Hello?", index=FakeIndex([]), encoder=FakeEncoder(), chat_model=spy, max_new_tokens=2
    )
    assert out["sources"] == [] and isinstance(out["answer"], str)
    assert spy.calls[0][0] == "Hello?" and spy.calls[0][1]["pixel_values"] is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0}, "k must be"), ({"temperature": -1.0}, "temperature"), ({"question": "  "}, "non-empty")],
)
def test_bad_arguments(tiny, kwargs: dict, match: str) -> None:
    args = {
        "question": "Hi",
        "index": FakeIndex(_rows(tiny.path)),
        "encoder": FakeEncoder(),
        "chat_model": tiny.model,
    } | kwargs
    question = args.pop("question")
    with pytest.raises(ValueError, match=match):
        grounded.answer(question, **args)


def test_sampling_when_temperature_positive(tiny) -> None:
    spy = SpyChat(tiny.model)
    grounded.answer(
        "Hi", index=FakeIndex([]), encoder=FakeEncoder(), chat_model=spy, max_new_tokens=2, temperature=0.7
    )
    assert spy.calls[0][1]["do_sample"] is True and spy.calls[0][1]["temperature"] == 0.7
