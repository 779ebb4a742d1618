"""Request and response models. Field names are the public contract of the API."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

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


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Label = Annotated[
    str, Field(min_length=1, max_length=1_000), AfterValidator(_utf8), AfterValidator(_not_blank)
]
Template = Annotated[str, Field(min_length=2, max_length=1_000, pattern=r"\{\}"), AfterValidator(_utf8)]
ImageB64 = Annotated[
    str, Field(min_length=1, description="base64 of an image file (data: URL prefix allowed)")
]
ImageId = Annotated[int, Field(ge=0, le=MAX_ID, description="id of an indexed image")]


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        listed = ", ".join(f"'{n}'" for n in names)
        raise ValueError(f"give exactly one of {listed} (got {len(given)})")


class SearchRequest(BaseModel):
    """Exactly one query: ``text``, ``image`` (base64) or ``image_id``."""

    model_config = ConfigDict(extra="forbid")

    text: Text | None = None
    image: ImageB64 | None = None
    image_id: ImageId | None = None
    k: int = Field(10, ge=1, le=1000, description="number of results")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        _exactly_one(self, ("text", "image", "image_id"))
        return self


class SearchResult(BaseModel):
    id: int
    path: str
    score: float


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float


class ClassifyRequest(BaseModel):
    """Zero-shot classification of one image (``image`` or ``image_id``) over ``labels``."""

    model_config = ConfigDict(extra="forbid")

    image: ImageB64 | None = None
    image_id: ImageId | None = None
    labels: list[Label] = Field(min_length=2, max_length=1000)
    templates: list[Template] | None = Field(
        None, min_length=1, max_length=100, description="prompt templates with '{}' for the label"
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifyRequest:
        _exactly_one(self, ("image", "image_id"))
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


class ChatRequest(BaseModel):
    """A question, answered from the given ``images`` or from the top ``k`` retrieved ones."""

    model_config = ConfigDict(extra="forbid")

    question: Text
    images: list[ImageB64] | None = Field(None, min_length=1, max_length=16)
    k: int = Field(3, ge=1, le=16, description="images to retrieve when 'images' is absent")
    history: list[tuple[Text, Text]] | None = Field(
        None, max_length=64, description="[user, assistant] pairs"
    )
    max_new_tokens: int = Field(512, ge=1, le=4096)
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0 = greedy decoding (so is anything below 0.01); above: sampling"
    )
    max_num_tiles: int | None = Field(None, ge=1, le=40)
    stream: bool = False


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
    index_size: int
    index_dir: str | None
    batching: bool


class ReloadResponse(BaseModel):
    reloaded: bool
    index_size: int
    index_dir: str


class ErrorResponse(BaseModel):
    detail: str | list | dict
