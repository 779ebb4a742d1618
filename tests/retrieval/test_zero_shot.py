"""retrieval.zero_shot.classify: probabilities, the class-embedding rule, the right answer on built cases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from golden_helpers import TINY, load_golden
from PIL import Image

from retrieval import load_encoder
from retrieval.base import Encoder
from retrieval.zero_shot import class_embeddings, classify
from retrieval.zero_shot_templates import DEFAULT_TEMPLATES

LABELS = ["cat", "dog", "car"]


class KeywordEncoder(Encoder):
    """Fake encoder: a text points along the axis of the label word it contains; images are given vectors."""

    name, embed_dim, logit_scale, mode, device = "fake", 4, 50.0, "fake", torch.device("cpu")

    def __init__(self) -> None:
        self.image_transform = lambda image: torch.zeros(3, 2, 2)
        self.seen: list[str] = []

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.seen.extend(texts)
        out = np.full((len(texts), 4), 0.1, dtype=np.float32)
        for i, text in enumerate(texts):
            for j, label in enumerate(LABELS + ["Katze"]):
                if label in text:
                    out[i, j] = 1.0 + 0.01 * len(text)  # template-dependent, same direction
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


def test_picks_the_right_class_and_sums_to_one() -> None:
    encoder = KeywordEncoder()
    images = np.eye(4, dtype=np.float32)[[2, 0, 1]]  # car, cat, dog
    probs = classify(encoder, images, LABELS)
    assert probs.shape == (3, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs.argmax(axis=1).tolist() == [2, 0, 1]
    assert probs.max() > 0.99
    assert len(encoder.seen) == len(LABELS) * len(DEFAULT_TEMPLATES)
    assert "a photo of a cat." in encoder.seen


def test_any_language_labels_and_templates() -> None:
    encoder = KeywordEncoder()
    probs = classify(
        encoder, np.eye(4, dtype=np.float32)[[3]], ["cat", "Katze"], templates=["ein Foto einer {}"]
    )
    assert probs.argmax() == 1


def test_class_embedding_is_renormalised_mean() -> None:
    encoder = KeywordEncoder()
    templates = ["a {}", "a photo of a {} in the wild"]
    classes = class_embeddings(encoder, ["dog"], templates)
    texts = encoder.encode_texts([t.replace("{}", "dog") for t in templates])
    mean = texts.mean(0)
    np.testing.assert_allclose(classes[0], mean / np.linalg.norm(mean), rtol=1e-6)


@pytest.mark.parametrize(
    ("labels", "templates", "error"),
    [([], None, ValueError), ("cat", None, TypeError), (["cat", " "], None, ValueError),
     (["cat"], ["no placeholder"], ValueError), (["cat"], [], ValueError)],
)  # fmt: skip
def test_bad_arguments(labels: object, templates: list[str] | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        classify(KeywordEncoder(), np.eye(4, dtype=np.float32)[:1], labels, templates)


def test_real_model_probabilities_are_softmax_of_reference_logits() -> None:
    """Template "{}" with the fixture texts as labels: probabilities = softmax(reference logits_per_image)."""
    golden = load_golden(TINY)
    keep = [i for i, text in enumerate(golden.texts) if text.strip()]  # an empty label is rejected
    encoder = load_encoder(golden.dir, device="cpu")
    labels = [golden.texts[i] for i in keep]
    probs = classify(encoder, [Image.open(f) for f in golden.image_files], labels, templates=["{}"])
    expected = torch.softmax(golden.expected["logits_per_image_c"][:, keep], dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert probs.argmax(1).tolist() == expected.argmax(1).tolist()
