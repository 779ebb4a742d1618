"""Typed errors of the encoder loaders; each message names the problem and the file involved."""

from __future__ import annotations

from collections.abc import Sequence

from retrieval.images import ImageDecodeError, ImageTooLarge

__all__ = [
    "CaptioningNotSupportedError",
    "ImageDecodeError",
    "ImageTooLarge",
    "ModelLoadError",
    "TokenizerNotFoundError",
    "UnknownModelTypeError",
    "WeightMismatchError",
]


class CaptioningNotSupportedError(RuntimeError):
    """The encoder has no text decoder (e.g. OpenCLIP): it cannot caption images."""


class ModelLoadError(RuntimeError):
    """A model folder exists but cannot be turned into an encoder."""


class UnknownModelTypeError(ModelLoadError, ValueError):
    """The folder's files do not describe a supported model kind."""


class TokenizerNotFoundError(ModelLoadError, FileNotFoundError):
    """The model folder has no tokenizer file."""


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class WeightMismatchError(ModelLoadError):
    """Checkpoint tensor names or shapes differ from the model's parameters."""

    def __init__(
        self,
        source: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing weights ({len(self.missing)}): {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected weights ({len(self.unexpected)}): {_preview(self.unexpected)}")
        if self.mismatched:
            parts.append(f"shape mismatches ({len(self.mismatched)}): {_preview(self.mismatched)}")
        super().__init__(f"{source}: checkpoint does not match the model: " + "; ".join(parts))
