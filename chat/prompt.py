"""Prompt building and tokenizer loading exactly as InternVL-Chat's ``chat()`` / ``batch_chat()``.

``build_query`` renders the conversation with the checkpoint's template and expands each ``<image>``
placeholder into ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per tile) + ``</img>``;
``build_batch_queries`` is the ``batch_chat`` variant; ``load_tokenizer`` returns a tokenizer that
reproduces the reference ids for original-format folders without ``trust_remote_code``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chat.templates import ConversationTemplate, get_template

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

History = Sequence[Sequence[str | None]]


def _template(template: ConversationTemplate | str) -> ConversationTemplate:
    return get_template(template) if isinstance(template, str) else template


def _check_patches(num_patches_list: Sequence[int] | None, num_image_token: int) -> list[int]:
    if int(num_image_token) < 1:
        raise ValueError(f"num_image_token must be >= 1, got {num_image_token}")
    patches = [int(n) for n in (num_patches_list or [])]
    bad = [n for n in patches if n < 1]
    if bad:
        raise ValueError(f"every entry of num_patches_list must be >= 1 tile, got {patches}")
    return patches


def image_tokens(num_patches: int, num_image_token: int) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` x (num_patches * num_image_token) + ``</img>``."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_patches) + IMG_END_TOKEN


def expand_image_placeholders(query: str, num_patches_list: Sequence[int], num_image_token: int) -> str:
    """Replace, for each n in order, the FIRST remaining ``<image>`` of ``query`` by the image tokens.

    Raises ``ValueError`` when the query has fewer placeholders than images (the reference would silently
    leave images without tokens and fail later). Extra placeholders stay as text, as in the reference.
    """
    patches = _check_patches(num_patches_list, num_image_token)
    found = query.count(IMAGE_PLACEHOLDER)
    if found < len(patches):
        raise ValueError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but {len(patches)} image(s) were given"
        )
    if found > len(patches):
        logger.warning("prompt has %d %s placeholders for %d images; the rest stay as text",
                       found, IMAGE_PLACEHOLDER, len(patches))
    for n in patches:
        query = query.replace(IMAGE_PLACEHOLDER, image_tokens(n, num_image_token), 1)
    return query


def build_query(
    template: ConversationTemplate | str,
    question: str,
    *,
    num_patches_list: Sequence[int] | None,
    num_image_token: int,
    history: History | None = None,
    system_message: str | None = None,
    image_placeholder_auto: bool = True,
) -> str:
    """The exact string ``chat()`` tokenizes.

    ``num_patches_list``: tiles per image, in the order of the pixel values (empty or None: no images;
    the reference default for one tensor is ``[len(pixel_values)]``). ``history``: ``(question, answer)``
    pairs of earlier turns. ``<image>\\n`` is prepended to ``question`` only when ``history`` is None,
    images are given and ``question`` has no ``<image>``; then each n replaces the first remaining
    ``<image>`` of the whole prompt (history included).
    """
    tmpl = _template(template)
    patches = _check_patches(num_patches_list, num_image_token)
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    if image_placeholder_auto and history is None and patches and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    query = tmpl.build_prompt(question, history, system_message=system_message)
    return expand_image_placeholders(query, patches, num_image_token)


def build_batch_queries(
    template: ConversationTemplate | str,
    questions: Sequence[str],
    *,
    num_patches_list: Sequence[int] | None,
    num_image_token: int,
    system_message: str | None = None,
    image_placeholder_auto: bool = True,
) -> list[str]:
    """The strings ``batch_chat()`` tokenizes: one image (``num_patches_list[i]`` tiles) per question.

    With images, each question without ``<image>`` gets ``<image>\\n`` prepended; no history.
    ``num_patches_list`` None or empty means a text-only batch.
    """
    tmpl = _template(template)
    patches = _check_patches(num_patches_list, num_image_token)
    if patches and len(patches) != len(questions):
        raise ValueError(f"batch_chat needs one num_patches entry per question: "
                         f"{len(questions)} questions, {len(patches)} entries")
    queries = []
    for i, question in enumerate(questions):
        if patches and image_placeholder_auto and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        query = tmpl.build_prompt(question, system_message=system_message)
        if patches:
            query = expand_image_placeholders(query, patches[i : i + 1], num_image_token)
        queries.append(query)
    return queries


def postprocess_response(text: str, template: ConversationTemplate | str) -> str:
    """The reference's cleanup of a decoded answer: ``text.split(sep.strip())[0].strip()``."""
    return _template(template).postprocess(text)


def stop_token_id(tokenizer: Any, template: ConversationTemplate | str) -> int:
    """Id of ``template.sep.strip()``, the only token that ends generation in chat().

    Falls back to ``tokenizer.eos_token_id`` (with a warning) when the template has no stop token or the
    tokenizer does not know it as a single token.
    """
    tmpl = _template(template)
    token = tmpl.stop_token
    token_id = tokenizer.convert_tokens_to_ids(token) if token else None
    if token_id is None or token_id == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer has no token {token!r} (template {tmpl.name!r}) and no eos token")
        logger.warning("stop token %r of template %r is not in the vocabulary; stopping on eos id %d",
                       token, tmpl.name, eos)
        return int(eos)
    return int(token_id)


def slow_prefix_space(tokenizer: Any, text: str, ids: list[int]) -> list[int]:
    """Keep the "▁" that transformers 4.x's slow ``LlamaTokenizer(legacy=False)`` prepends to a text.

    The reference (4.37) drops it only when the text starts with a token of ``all_special_tokens``; a prompt
    that starts with an added token outside that map (Phi-3's ``<|system|>`` in some tokenizer files) keeps
    it, while transformers 5 drops it. No-op for every other tokenizer.
    """
    if getattr(tokenizer, "legacy", True) is not False or not text:
        return ids
    starts = [t for t in tokenizer.get_added_vocab() if text.startswith(t)]
    if not starts or max(starts, key=len) in tokenizer.all_special_tokens:
        return ids
    at = 1 if getattr(tokenizer, "add_bos_token", False) and ids[:1] == [tokenizer.bos_token_id] else 0
    return [*ids[:at], tokenizer.convert_tokens_to_ids("▁"), *ids[at:]]


def tokenize_batch(tokenizer: Any, queries: Sequence[str]) -> dict[str, Any]:
    """Left-padded ``input_ids`` / ``attention_mask`` LongTensors, as batch_chat tokenizes.

    Pads with the tokenizer's pad token (its eos when it has none); the tokenizer object is not modified.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; cannot pad a batch")
    rows = [slow_prefix_space(tokenizer, q, tokenizer(q)["input_ids"]) for q in queries]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------- tokenizer

_INTERNLM2_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


def _tokenizer_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "tokenizer_config.json"
    if not cfg_file.is_file():
        return {}
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_file}: unreadable tokenizer config ({exc})") from exc


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Tokenizer of an original-format (or HF-native) InternVL-Chat folder, never with remote code.

    * ``tokenizer_class`` InternLM2Tokenizer (remote code in real InternLM2 checkpoints) maps to
      ``LlamaTokenizer(legacy=True)`` on the same ``tokenizer.model``: InternLM2Tokenizer
      sentencepiece-encodes each segment between special tokens with its dummy prefix, which is exactly
      the legacy behaviour.
      BOS is added unless the config says otherwise, and decoding cleans up tokenization spaces
      (``" ."`` -> ``"."``) as InternLM2Tokenizer does unconditionally.
    * a ``tokenizer_class`` that transformers ships is loaded with that class (the folder's ``legacy`` /
      ``add_bos_token`` settings apply; ids equal ``AutoTokenizer.from_pretrained(path,
      trust_remote_code=False)``, without parsing the ``internvl_chat`` config.json);
    * otherwise ``AutoTokenizer.from_pretrained(path, trust_remote_code=False)``.
    """
    import transformers
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a model folder")
    cfg = _tokenizer_config(folder)
    cls_name = str(cfg.get("tokenizer_class") or "")
    if cls_name in _INTERNLM2_CLASSES:
        if not (folder / "tokenizer.model").is_file():
            raise ValueError(f"{folder}: {cls_name} folder without tokenizer.model")
        logger.info("%s: loading %s as LlamaTokenizer(legacy=True)", folder, cls_name)
        return transformers.LlamaTokenizer.from_pretrained(
            str(folder),
            legacy=True,
            add_bos_token=bool(cfg.get("add_bos_token", True)),
            add_eos_token=bool(cfg.get("add_eos_token", False)),
            clean_up_tokenization_spaces=True,
            clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
        )
    cls = tokenizer_class_from_name(cls_name) if cls_name else None
    if cls is not None:
        return cls.from_pretrained(str(folder))
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (ValueError, OSError) as exc:  # e.g. a remote-code tokenizer class transformers does not ship
        raise ValueError(
            f"{folder}: cannot load tokenizer {cls_name or '(no tokenizer_class)'} without "
            f"trust_remote_code ({exc})"
        ) from exc
