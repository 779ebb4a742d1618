"""Placeholder: the retrieval helper replaces this with the real loader."""

from __future__ import annotations


def load_encoder(path, *, mode=None, device=None, dtype=None):  # noqa: ANN001, ANN201
    raise NotImplementedError("load_encoder is being implemented")
