"""``ChatModel``: InternVL-Chat's ``chat`` / ``batch_chat`` (and streaming) on transformers' native classes.

Behaviour follows the official ``InternVLChatModel`` (OpenGVLab/InternVL): the prompt is built by the
checkpoint's conversation template with the checkpoint's ``system_message`` (config.json; the template's
default otherwise; any call may pass its own), each ``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x
(tiles x tokens per tile) + ``</img>``, generation stops only on the template separator token, and the
answer is decoded with special tokens skipped, cut at the separator and stripped.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from chat.convert import ChatSettings
from chat.generation import AnswerDecoder, NewTokensRepetitionPenalty, incremental_text, iter_new_tokens
from chat.prompt import build_batch_queries, build_query, stop_token_id, tokenize_batch
from chat.templates import get_template
from chat.tiling import tile_images
from chat.transforms import ImageProcessorTransform, TileTransform
from chat.video import load_video, video_prefix

logger = logging.getLogger(__name__)

#: sampling below this temperature is done as greedy decoding (its limit), since logits / T overflow
MIN_SAMPLING_TEMPERATURE = 1e-2

MAX_TILES_LIMIT = 40
History = list[tuple[str, str]]


class ChatModel:
    """An InternVL-Chat model (native ``InternVLForConditionalGeneration``), its tokenizer and template."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: ChatSettings,
        *,
        llm_config: dict[str, Any] | None = None,
        system_message: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = get_template(settings.template)
        if system_message is None:  # the checkpoint's (config.json), else the template's default
            system_message = settings.system_message
        self.system_message = self.template.system_message if system_message is None else system_message
        self.image_transform: Any = (
            ImageProcessorTransform(settings.image_processor, settings.image_size)
            if settings.image_processor and not settings.dynamic_image_size
            else TileTransform(settings.image_size)
        )
        self._warned_tiles = False
        self.num_image_token = settings.num_image_token
        self.img_context_token_id = int(model.config.image_token_id)
        self.stop_token_id = stop_token_id(tokenizer, self.template)
        self._decode = AnswerDecoder(tokenizer)
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_id
        )
        llm_config = llm_config or {}
        # the reference's LLM generate() falls back to these llm_config values
        self._llm_defaults = {
            "repetition_penalty": float(llm_config.get("repetition_penalty") or 1.0),
            "top_k": llm_config.get("top_k", 50),
        }
        model.generation_config = GenerationConfig(
            eos_token_id=self.stop_token_id, pad_token_id=self.pad_token_id, max_new_tokens=512
        )

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Device of the model's first parameters (inputs go there)."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the model."""
        return self.model.dtype

    # ------------------------------------------------------------------ prompts
    def build_prompt(
        self,
        question: str,
        num_patches_list: Sequence[int] | None,
        history: Sequence | None = None,
        *,
        system_message: str | None = None,
    ) -> str:
        """The exact prompt ``chat()`` tokenizes: ``<image>\\n`` prepended when images are given, there is
        no history and the question has no placeholder; each ``<image>`` expanded to its image tokens.

        ``system_message`` replaces the model's (the checkpoint's or the template's) for this prompt only.
        """
        return build_query(
            self.template,
            question,
            num_patches_list=num_patches_list,
            num_image_token=self.num_image_token,
            history=history,
            system_message=self.system_message if system_message is None else system_message,
        )

    # ------------------------------------------------------------------ images
    def tile_images(
        self, images: Image.Image | Sequence[Any], max_num_tiles: int | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """PIL images (or paths/bytes) -> ``(pixel_values (sum n_i, 3, S, S), num_patches_list)``.

        A checkpoint without dynamic tiling (``dynamic_image_size: false``) gets one ``S x S`` tile per image
        and no thumbnail; ``max_num_tiles`` is ignored there (logged once), as the reference ignores it.
        """
        if isinstance(images, (Image.Image, str, bytes, os.PathLike)):
            images = [images]
        if not self.settings.dynamic_image_size:
            if max_num_tiles is not None and not self._warned_tiles:
                self._warned_tiles = True
                logger.info(
                    "this checkpoint does not tile (dynamic_image_size: false): max_num_tiles=%s is ignored, "
                    "each image is one %dx%d tile",
                    max_num_tiles, self.settings.image_size, self.settings.image_size,
                )
            return tile_images(
                list(images), image_size=self.settings.image_size, max_num=1, dynamic=False,
                transform=self.image_transform,
            )  # fmt: skip
        max_num = self.settings.max_dynamic_patch if max_num_tiles is None else int(max_num_tiles)
        if not 1 <= max_num <= MAX_TILES_LIMIT:
            raise ValueError(f"max_num_tiles must be between 1 and {MAX_TILES_LIMIT}, got {max_num_tiles}")
        return tile_images(
            list(images),
            image_size=self.settings.image_size,
            max_num=max_num,
            min_num=min(self.settings.min_dynamic_patch, max_num),
            use_thumbnail=self.settings.use_thumbnail,
            transform=self.image_transform,
        )

    def load_video(
        self,
        video: Any,
        *,
        num_segments: int = 8,
        max_num_tiles: int | None = None,
        bound: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """A video (path, bytes or binary file) -> ``(pixel_values, num_patches_list)``, one entry per frame.

        The model cards' ``load_video`` at this checkpoint's tile size and with its tile transform:
        ``num_segments`` frames, each tiled with up to ``max_num_tiles`` tiles (default 1, the model cards'
        ``max_num``; a thumbnail is added when a frame has more than one tile). ``bound`` is ``(start, end)``
        in seconds. A checkpoint without dynamic tiling gets one tile per frame.
        """
        max_num = 1 if max_num_tiles is None else int(max_num_tiles)
        if not 1 <= max_num <= MAX_TILES_LIMIT:
            raise ValueError(f"max_num_tiles must be between 1 and {MAX_TILES_LIMIT}, got {max_num_tiles}")
        if not self.settings.dynamic_image_size:
            max_num = 1
        return load_video(
            video, bound=bound, input_size=self.settings.image_size, max_num=max_num,
            num_segments=num_segments, transform=self.image_transform,
        )  # fmt: skip

    def _check_pixels(self, pixel_values: torch.Tensor | None, num_patches_list: Sequence[int]) -> None:
        if pixel_values is None:
            if num_patches_list and sum(num_patches_list) > 0:
                raise ValueError("num_patches_list given without pixel_values")
            return
        size = self.settings.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be (tiles, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        if len(pixel_values) != sum(num_patches_list):
            raise ValueError(
                f"pixel_values has {len(pixel_values)} tiles but num_patches_list sums to "
                f"{sum(num_patches_list)}"
            )

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``(n, 3, S, S)`` -> LLM input embeddings ``(n, num_image_token, hidden)`` (ViT, mlp1)."""
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype), return_dict=True
        )
        return out.pooler_output

    # ------------------------------------------------------------------ generation
    def generation_config(
        self,
        *,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> GenerationConfig:
        """Stop only on the template separator token, as the reference chat()."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        kwargs: dict[str, Any] = {"repetition_penalty": self._llm_defaults["repetition_penalty"]}
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if do_sample and temperature < MIN_SAMPLING_TEMPERATURE:
            do_sample = False  # logits / tiny temperature overflow; the limit of such sampling is greedy
        if do_sample:
            kwargs.update(
                temperature=float(temperature), top_p=float(top_p), top_k=self._llm_defaults["top_k"]
            )
        return GenerationConfig(
            max_new_tokens=int(max_new_tokens),
            do_sample=bool(do_sample),
            num_beams=1,
            eos_token_id=self.stop_token_id,
            pad_token_id=self.pad_token_id,
            **kwargs,
        )

    def encode(self, queries: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize prompts as the reference does (left padding for batches)."""
        return tokenize_batch(self.tokenizer, list(queries))

    @torch.inference_mode()
    def generate_ids(
        self,
        queries: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        *,
        generation_config: GenerationConfig | None = None,
    ) -> list[list[int]]:
        """New token ids per prompt, each up to and including its first stop token.

        One prompt: :meth:`iter_ids` (what chat() and stream() run). Several: one left-padded
        ``generate()`` batch (batch_chat), post-stop padding dropped.
        """
        config = generation_config or self.generation_config()
        if len(queries) == 1:
            return [list(self.iter_ids(queries[0], pixel_values, config))]
        inputs = {k: v.to(self.device) for k, v in self.encode(queries).items()}
        extra = {} if pixel_values is None else {"pixel_values": pixel_values.to(self.device, self.dtype)}
        width = inputs["input_ids"].shape[1]
        processors = LogitsProcessorList()
        if config.repetition_penalty not in (None, 1.0):  # the reference penalises new tokens only
            processors.append(NewTokensRepetitionPenalty(config.repetition_penalty, width))
            config = copy.deepcopy(config)
            config.repetition_penalty = 1.0
        out = self.model.generate(**inputs, **extra, generation_config=config, logits_processor=processors)
        new = out[:, width:].tolist()
        return [ids[: ids.index(self.stop_token_id) + 1] if self.stop_token_id in ids else ids for ids in new]

    def iter_ids(
        self, query: str, pixel_values: torch.Tensor | None, config: GenerationConfig
    ) -> Iterator[int]:
        """New token ids of one prompt, each yielded as soon as it is chosen (KV-cached decoding)."""
        input_ids = self.encode([query])["input_ids"].to(self.device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device, self.dtype)
        return iter_new_tokens(self.model, input_ids, config, pixel_values=pixel_values)

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text: special tokens skipped (as the reference tokenizer did), cut at the separator,
        stripped."""
        return self.template.postprocess(self._decode(list(ids)))

    def _prepare(
        self,
        question: str,
        images: Any,
        history: Sequence | None,
        pixel_values: torch.Tensor | None,
        num_patches_list: Sequence[int] | None,
        max_num_tiles: int | None,
        system_message: str | None = None,
        *,
        video: Any = None,
        num_segments: int = 8,
        bound: Sequence[float] | None = None,
    ) -> tuple[str, str, torch.Tensor | None]:
        if isinstance(images, Sequence) and not isinstance(images, (str, bytes)) and len(images) == 0:
            images = None  # an empty list means no images
        if video is not None:
            if images is not None or pixel_values is not None:
                raise ValueError("pass either video, images or pixel_values, not several")
            pixel_values, num_patches_list = self.load_video(
                video, num_segments=num_segments, max_num_tiles=max_num_tiles, bound=bound
            )
            if history is None and "<image>" not in question:  # first turn: the model cards' prefix
                question = video_prefix(len(num_patches_list)) + question
        if images is not None:
            if pixel_values is not None:
                raise ValueError("pass either images or pixel_values, not both")
            pixel_values, num_patches_list = self.tile_images(images, max_num_tiles)
            if history is None and len(num_patches_list) > 1 and "<image>" not in question:
                question = (
                    "".join(f"Image-{i + 1}: <image>\n" for i in range(len(num_patches_list))) + question
                )
        if num_patches_list is None:
            num_patches_list = [len(pixel_values)] if pixel_values is not None else []
        self._check_pixels(pixel_values, num_patches_list)
        if history is None and num_patches_list and "<image>" not in question:
            question = "<image>\n" + question  # what chat() records in the history
        query = self.build_prompt(question, num_patches_list, history, system_message=system_message)
        return question, query, pixel_values

    def chat(
        self,
        question: str,
        images: Any = None,
        history: Sequence | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        max_num_tiles: int | None = None,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        return_history: bool = False,
        system_message: str | None = None,
        video: Any = None,
        num_segments: int = 8,
        bound: Sequence[float] | None = None,
    ) -> str | tuple[str, History]:
        """Answer ``question`` about ``images`` (PIL, tiled here), a ``video`` or pre-tiled ``pixel_values``.

        Returns the answer, or ``(answer, history)`` with ``return_history=True`` (the caller's list is
        not modified). ``system_message`` replaces the checkpoint's (or the template's) for this call.
        ``video`` (path, bytes or binary file) is sampled as :meth:`load_video` does (``num_segments``
        frames, ``max_num_tiles`` tiles each, default 1, ``bound`` in seconds); on the first turn the
        question gets the model cards' ``Frame1: <image>\\n...`` prefix. Pass the same video (or its
        ``pixel_values`` + ``num_patches_list``) with ``history`` for follow-up turns.
        """
        question, query, pixel_values = self._prepare(
            question, images, history, pixel_values, num_patches_list, max_num_tiles, system_message,
            video=video, num_segments=num_segments, bound=bound,
        )  # fmt: skip
        config = self.generation_config(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p
        )
        answer = self.decode(self.generate_ids([query], pixel_values, generation_config=config)[0])
        if return_history:
            return answer, [*(tuple(t) for t in history or ()), (question, answer)]
        return answer

    def stream(
        self,
        question: str,
        images: Any = None,
        history: Sequence | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        max_num_tiles: int | None = None,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        system_message: str | None = None,
        video: Any = None,
        num_segments: int = 8,
        bound: Sequence[float] | None = None,
    ) -> Iterator[str]:
        """Same arguments as :meth:`chat`; yields text pieces whose concatenation is chat()'s answer.

        Tokens are generated in the consuming thread as the iterator is read; closing it stops generation.
        """
        _, query, pixel_values = self._prepare(
            question, images, history, pixel_values, num_patches_list, max_num_tiles, system_message,
            video=video, num_segments=num_segments, bound=bound,
        )  # fmt: skip
        config = self.generation_config(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p
        )
        yield from self.stream_prompt(query, pixel_values, config)

    def prepare(
        self,
        question: str,
        images: Any = None,
        history: Sequence | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        max_num_tiles: int | None = None,
        system_message: str | None = None,
        video: Any = None,
        num_segments: int = 8,
        bound: Sequence[float] | None = None,
    ) -> tuple[str, torch.Tensor | None]:
        """The exact prompt :meth:`chat` tokenizes for these arguments, and its tiles."""
        _, query, pixel_values = self._prepare(
            question, images, history, pixel_values, num_patches_list, max_num_tiles, system_message,
            video=video, num_segments=num_segments, bound=bound,
        )  # fmt: skip
        return query, pixel_values

    def prompt_length(self, query: str) -> int:
        """Tokens in a built prompt, image tokens included (what the LLM reads)."""
        return int(self.encode([query])["input_ids"].shape[1])

    def stream_prompt(
        self,
        query: str,
        pixel_values: torch.Tensor | None,
        config: GenerationConfig,
        generated: list[int] | None = None,
    ) -> Iterator[str]:
        """Text pieces of the answer to a built prompt (:meth:`prepare`); each new token id is appended to
        ``generated`` when given. Closing the iterator stops generation."""
        tokens = self.iter_ids(query, pixel_values, config)

        def seen() -> Iterator[int]:
            for token in tokens:
                if generated is not None:
                    generated.append(int(token))
                yield token

        try:
            yield from incremental_text(seen(), self._decode, self.template, self.stop_token_id)
        finally:
            tokens.close()

    def batch_chat(
        self,
        questions: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        *,
        images: Sequence[Any] | None = None,
        max_num_tiles: int | None = None,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        system_message: str | None = None,
    ) -> list[str]:
        """One image (``num_patches_list[i]`` tiles) per question, answered in one left-padded batch.

        ``system_message`` replaces the checkpoint's (or the template's) for this call.
        """
        questions = list(questions)
        if not questions:
            return []
        if images is not None:
            if pixel_values is not None:
                raise ValueError("pass either images or pixel_values, not both")
            if len(images) != len(questions):
                raise ValueError(f"{len(images)} images for {len(questions)} questions")
            pixel_values, num_patches_list = self.tile_images(images, max_num_tiles)
        if pixel_values is None:
            num_patches_list = [0] * len(questions)
        elif num_patches_list is None:
            raise ValueError("batch_chat needs num_patches_list (tiles per question) with pixel_values")
        if len(num_patches_list) != len(questions):
            raise ValueError(
                f"num_patches_list has {len(num_patches_list)} entries for {len(questions)} questions"
            )
        self._check_pixels(pixel_values, num_patches_list)
        queries = build_batch_queries(
            self.template,
            questions,
            num_patches_list=None if pixel_values is None else num_patches_list,
            num_image_token=self.num_image_token,
            system_message=self.system_message if system_message is None else system_message,
        )
        config = self.generation_config(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p
        )
        return [
            self.decode(ids) for ids in self.generate_ids(queries, pixel_values, generation_config=config)
        ]

    def __repr__(self) -> str:
        return (
            f"ChatModel(llm={self.settings.llm_arch}, template={self.template.name!r}, "
            f"device={self.device}, dtype={self.dtype})"
        )
