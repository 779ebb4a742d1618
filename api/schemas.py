"""Request and response models. Field names are the public contract of the API."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from chat.model import MIN_SAMPLING_TEMPERATURE  # noqa: F401  (re-exported: below it, greedy)
from retrieval.zero_shot_templates import DEFAULT_TEMPLATES

MAX_PROMPTS = 20_000  # labels x templates encoded per /classify request
MAX_ID = 2**53 - 1  # largest id exactly representable in JSON numbers (and JavaScript)


def _utf8(value: str) -> str:
    """Reject strings that cannot be UTF-8 encoded (lone surrogates from JSON ``\\ud800`` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (lone surrogate)") from exc
    return value


Text = Annotated[str, Field(min_length=1, max_length=10_000), AfterValidator(_utf8)]


def _json_integer(value: object) -> object:
    """A JSON-schema ``integer``: an int or an integral float (``5.0``); never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def Integer(**constraints: Any) -> Any:  # noqa: N802  (a type)
    """``int`` with JSON-schema ``integer`` semantics and the given bounds (``ge``, ``le``), which must come
    before the validator to appear in the OpenAPI document as ``minimum`` / ``maximum``."""
    return Annotated[int, Field(**constraints), BeforeValidator(_json_integer)]


# whitespace as ECMA-262 patterns (JSON Schema) and Python's str.strip define it, both: the schema and the
# server agree on what is blank
_WHITESPACE = (
    "\t\n\v\f\r\x1c-\x1f \x85\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
NOT_BLANK = f"[^{_WHITESPACE}]"


def _not_blank(value: str) -> str:
    if re.search(NOT_BLANK, value) is None:
        raise ValueError("must not be blank")
    return value


Label = Annotated[
    str,
    Field(min_length=1, max_length=1_000, pattern=NOT_BLANK, description="not blank"),
    AfterValidator(_utf8),
    AfterValidator(_not_blank),
]
Template = Annotated[str, Field(min_length=2, max_length=1_000, pattern=r"\{\}"), AfterValidator(_utf8)]
ImageB64 = Annotated[
    str,
    Field(
        min_length=1,
        description="base64 of an image file (data: URL prefix allowed)",
        json_schema_extra={"format": "byte", "contentMediaType": "image/*"},
    ),
]
#: custom string format of base64 video files: schemathesis hooks generate real videos for it
VIDEO_FORMAT = "video-byte"
VideoB64 = Annotated[
    str,
    Field(
        min_length=1,
        description="base64 of a video file, e.g. mp4 or mkv (data: URL prefix allowed)",
        json_schema_extra={"format": VIDEO_FORMAT, "contentMediaType": "video/*"},
    ),
]
#: ``num_segments`` bounds: frames sampled from a /chat video
MAX_NUM_SEGMENTS = 64
ImageId = Annotated[Integer(ge=0, le=MAX_ID), Field(description="id of an indexed image")]


def one_of_present(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """``oneOf`` branches: the body has ``name`` (not null), for each name."""
    return [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names]


def exactly_one_of(*names: str) -> dict[str, Any]:
    """JSON-schema ``oneOf``: exactly one of ``names`` is present and not null (what :func:`_exactly_one`
    enforces), so that the OpenAPI document admits only bodies the server accepts."""

    def extra(schema: dict[str, Any]) -> None:
        schema["oneOf"] = one_of_present(names)

    return {"json_schema_extra": extra}


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        listed = ", ".join(f"'{n}'" for n in names)
        raise ValueError(f"give exactly one of {listed} (got {len(given)})")


#: what an index row holds: an image, a whole video, or a ``[t_start, t_end)`` segment of a video
RowKind = Literal["image", "video", "segment"]
SearchMode = Literal["vector", "keyword", "hybrid"]
FoundBy = Literal["vector", "keyword"]
#: Unix seconds whose nanoseconds fit SQLite's 64-bit integers
MAX_UNIX_SECONDS = 9_000_000_000.0
MAX_FILTER_IDS = 10_000
PathText = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_utf8)]
Extension = Annotated[str, Field(pattern=r"^\.?[A-Za-z0-9_+-]{1,16}$", description="e.g. 'jpg' or '.png'")]
Seconds = Annotated[float, Field(ge=-MAX_UNIX_SECONDS, le=MAX_UNIX_SECONDS, strict=True, allow_inf_nan=False)]
Pixels = Integer(ge=0, le=2**31 - 1)


class SearchFilters(BaseModel):
    """Row conditions, all optional, combined with AND (``index.filters``)."""

    model_config = ConfigDict(extra="forbid")

    path_prefix: PathText | None = Field(None, description="start of the absolute path or of the relpath")
    path_glob: PathText | None = Field(None, description="SQLite GLOB over the absolute path or the relpath")
    extensions: list[Extension] | None = Field(None, min_length=1, max_length=64)
    kinds: list[RowKind] | None = Field(None, min_length=1, max_length=3)
    mtime_from: Seconds | None = Field(None, description="Unix seconds, inclusive")
    mtime_to: Seconds | None = Field(None, description="Unix seconds, inclusive")
    min_width: Pixels | None = None
    max_width: Pixels | None = None
    min_height: Pixels | None = None
    max_height: Pixels | None = None
    ids: list[ImageId] | None = Field(None, min_length=1, max_length=MAX_FILTER_IDS)


def _keyword_needs_text(schema: dict[str, Any]) -> None:
    schema["oneOf"] = one_of_present(("text", "image", "image_id"))
    schema["not"] = {  # mode "keyword" with an image or image_id query (no text)
        "required": ["mode"],
        "properties": {"mode": {"const": "keyword"}},
        "anyOf": [
            {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
            for name in ("image", "image_id")
        ],
    }


class SearchRequest(BaseModel):
    """Exactly one query: ``text``, ``image`` (base64) or ``image_id``; mode ``keyword`` needs ``text``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_keyword_needs_text)

    text: Text | None = None
    image: ImageB64 | None = None
    image_id: ImageId | None = None
    k: Integer(ge=1, le=1000) = Field(10, description="number of results")
    mode: SearchMode = Field(
        "vector",
        description="'vector' (embedding similarity), 'keyword' (file names, paths and captions; needs "
        "'text') or 'hybrid' (reciprocal-rank fusion of both)",
    )
    filters: SearchFilters | None = None
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        strict=True,
        description="hybrid: weight of the vector ranking (keyword: 1 - alpha)",
    )
    rrf_k: Integer(ge=0, le=10_000) = Field(60, description="hybrid: reciprocal-rank fusion constant")
    offset: Integer(ge=0, le=10_000) = Field(0, description="results to skip (pagination)")
    min_score: float | None = Field(
        None, ge=-1e9, le=1e9, strict=True, allow_inf_nan=False, description="drop results scoring below this"
    )
    deduplicate: bool = Field(False, strict=True, description="collapse near-duplicates to their best copy")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        _exactly_one(self, ("text", "image", "image_id"))
        if self.mode == "keyword" and self.text is None:
            raise ValueError("mode 'keyword' needs a 'text' query")
        return self


class SearchResult(BaseModel):
    id: int
    path: str
    score: float
    kind: RowKind = Field("image", description="'image', 'video' (a whole video) or 'segment' (of a video)")
    t_start: float | None = Field(None, description="video and segment rows: start in seconds (else null)")
    t_end: float | None = Field(None, description="video and segment rows: end in seconds (else null)")
    caption: str | None = Field(None, description="the stored caption, when the index has one")
    found_by: list[FoundBy] = Field(
        default_factory=lambda: ["vector"], description="the rankings that found this result"
    )


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float


class DuplicateGroup(BaseModel):
    """Near-duplicate rows, best copy first (largest width x height, then larger file)."""

    results: list[SearchResult]


class DuplicatesResponse(BaseModel):
    threshold: float
    total_groups: int
    groups: list[DuplicateGroup]


class ClassifyRequest(BaseModel):
    """Zero-shot classification of one image (``image`` or ``image_id``) or video (``video``, or the
    ``image_id`` of a video / segment row: its frame-averaged embedding) over ``labels``."""

    model_config = ConfigDict(extra="forbid", **exactly_one_of("image", "image_id", "video"))

    image: ImageB64 | None = None
    image_id: ImageId | None = Field(None, description="id of an indexed image, video or video segment")
    video: VideoB64 | None = Field(
        None, description="a video: classified by the mean embedding of uniformly sampled frames"
    )
    labels: list[Label] = Field(min_length=2, max_length=1000, json_schema_extra={"uniqueItems": True})
    templates: list[Template] | None = Field(
        None, min_length=1, max_length=100, description="prompt templates with '{}' for the label"
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifyRequest:
        _exactly_one(self, ("image", "image_id", "video"))
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        prompts = len(self.labels) * len(self.templates or DEFAULT_TEMPLATES)
        if prompts > MAX_PROMPTS:
            raise ValueError(f"labels x templates = {prompts} text prompts, over the limit of {MAX_PROMPTS}")
        return self


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    label: str
    scores: list[LabelScore]


#: /caption bounds: beams, new tokens, prompt length (characters), top-k
MAX_CAPTION_BEAMS = 8
MAX_CAPTION_TOKENS = 128
MAX_CAPTION_PROMPT = 1_000
MAX_CAPTION_TOP_K = 1_000
MAX_SEED = 2**32 - 1
CaptionPrompt = Annotated[str, Field(max_length=MAX_CAPTION_PROMPT), AfterValidator(_utf8)]


class CaptionRequest(BaseModel):
    """Caption one image: ``image`` (base64) or ``image_id`` (an indexed image; for a video or segment
    row, its middle frame), with the prompt and generation knobs of ``encoder.caption``."""

    model_config = ConfigDict(extra="forbid", **exactly_one_of("image", "image_id"))

    image: ImageB64 | None = None
    image_id: ImageId | None = Field(
        None, description="id of an indexed image (a video or segment row: its middle frame)"
    )
    prompt: CaptionPrompt = Field("English caption:", description="text the caption continues")
    num_beams: Integer(ge=1, le=MAX_CAPTION_BEAMS) = Field(5, description="1 = greedy (or sampling)")
    min_new_tokens: Integer(ge=0, le=MAX_CAPTION_TOKENS) = Field(
        8, description="at least this many tokens (capped at max_new_tokens)"
    )
    max_new_tokens: Integer(ge=1, le=MAX_CAPTION_TOKENS) = 30
    do_sample: bool = Field(False, strict=True, description="sample instead of greedy / beam search")
    temperature: float = Field(
        1.0, ge=MIN_SAMPLING_TEMPERATURE, le=2.0, strict=True, description="sampling only"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True, description="nucleus sampling (1 = off)")
    top_k: Integer(ge=0, le=MAX_CAPTION_TOP_K) = Field(50, description="sampling only; 0 = off")
    seed: Integer(ge=0, le=MAX_SEED) | None = Field(
        None, description="sampling: the same seed gives the same caption"
    )

    @model_validator(mode="after")
    def _one_image(self) -> CaptionRequest:
        _exactly_one(self, ("image", "image_id"))
        return self


class CaptionResponse(BaseModel):
    caption: str
    prompt: str
    image_id: int | None = Field(None, description="the captioned indexed image, if one was given")
    took_ms: float


Question = Annotated[
    str,
    Field(min_length=1, max_length=10_000, pattern=NOT_BLANK, description="not blank"),
    AfterValidator(_utf8),
    AfterValidator(_not_blank),
]


def _not_both(*names: str) -> dict[str, Any]:
    """JSON-schema ``not``: the fields ``names`` are not all present and not null."""

    def extra(schema: dict[str, Any]) -> None:
        schema["not"] = {
            "required": list(names),
            "properties": {name: {"not": {"type": "null"}} for name in names},
        }

    return {"json_schema_extra": extra}


class ChatRequest(BaseModel):
    """A question, answered from the given ``images``, a ``video``, or the top ``k`` retrieved images."""

    model_config = ConfigDict(extra="forbid", **_not_both("images", "video"))

    question: Question
    images: list[ImageB64] | None = Field(None, min_length=1, max_length=16)
    video: VideoB64 | None = Field(None, description="a video to answer about (not with 'images')")
    num_segments: Integer(ge=1, le=MAX_NUM_SEGMENTS) = Field(
        8, description="frames sampled from 'video' (the model cards' get_index)"
    )
    k: Integer(ge=1, le=16) = Field(3, description="images to retrieve when 'images' is absent")
    history: list[tuple[Text, Text]] | None = Field(
        None, max_length=64, description="[user, assistant] pairs"
    )
    max_new_tokens: Integer(ge=1, le=4096) = 512
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        strict=True,
        description="0 = greedy decoding (so is anything below 0.01); above: sampling"
    )
    max_num_tiles: Integer(ge=1, le=40) | None = None
    stream: bool = Field(False, strict=True)

    @model_validator(mode="after")
    def _images_or_video(self) -> ChatRequest:
        if self.images is not None and self.video is not None:
            raise ValueError("give either 'images' or 'video', not both")
        return self


class Source(BaseModel):
    id: int
    path: str
    score: float


class ChatResponse(BaseModel):
    answer: str
    sources: list[Source]


class ModelsInfo(BaseModel):
    encoder: str | None
    encoder_mode: str | None
    embed_dim: int | None
    chat: str | None


class HealthResponse(BaseModel):
    ready: bool
    models: ModelsInfo
    device: str | None
    dtype: str | None
    index_size: int
    index_dir: str | None
    batching: bool


class ReloadResponse(BaseModel):
    reloaded: bool
    index_size: int
    index_dir: str


class ErrorResponse(BaseModel):
    detail: str | list | dict
