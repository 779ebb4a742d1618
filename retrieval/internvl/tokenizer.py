"""The InternVL-C/G text tokenizer: the checkpoint's LLaMA sentencepiece model, used as the reference does.

``[BOS] + pieces("summarize:" + text)[:max_length - 2] + [EOS]``, right-padded with 0 to ``max_length`` (80).
This equals ``AutoTokenizer(use_fast=False, add_eos_token=True)`` with ``pad_token_id = 0`` and right padding,
without the transformers 5 left-padding trap (left padding breaks the ``(ids > 0).sum(1) - 1`` pooling).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from retrieval.errors import ModelLoadError, TokenizerNotFoundError

logger = logging.getLogger(__name__)

#: hard-coded in the reference InternVL-C/G code
TEXT_PREFIX = "summarize:"
MAX_LENGTH = 80
PAD_ID = 0
TOKENIZER_FILE = "tokenizer.model"


class InternVLTokenizer:
    """Texts (any language) -> LongTensor (N, max_length) of right-padded token ids."""

    def __init__(
        self,
        model_file: str | os.PathLike,
        prefix: str = TEXT_PREFIX,
        max_length: int = MAX_LENGTH,
        pad_id: int = PAD_ID,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS + EOS), got {max_length}")
        self.model_file = str(model_file)
        self.prefix = prefix
        self.max_length = max_length
        self.pad_id = pad_id
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(f"{model_file}: cannot load sentencepiece model ({exc})") from exc
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ModelLoadError(f"{model_file}: sentencepiece model defines no BOS/EOS ids")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: object) -> InternVLTokenizer:
        """Load ``tokenizer.model`` from a model folder."""
        file = Path(path) / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerNotFoundError(
                f"tokenizer not found: {file} (the model folder needs {TOKENIZER_FILE})"
            )
        return cls(file, **kwargs)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """One text -> ids with BOS/EOS, truncated to ``max_length`` (BOS and EOS kept), unpadded."""
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        pieces = self.sp.encode(self.prefix + text)[: self.max_length - 2]
        return [self.bos_id, *pieces, self.eos_id]

    def encode_prompt(self, prompt: str) -> list[int]:
        """A captioning prompt -> ``[BOS] + pieces(prompt)``: no text prefix, no EOS, no truncation (the
        reference tokenizes it with ``add_eos_token=False``)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be str, got {type(prompt).__name__}")
        return [self.bos_id, *self.sp.encode(prompt)]

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Texts -> LongTensor (N, max_length), right-padded with ``pad_id``."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        return ids
