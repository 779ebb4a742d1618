"""Request and response models of the OpenAI-compatible ``/v1`` routes (the OpenAI wire format)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from api.schemas import MAX_ID, MAX_NUM_SEGMENTS, Integer, Source, _utf8

#: what an image URL the server decodes itself looks like (``data:image/png;base64,...``)
DATA_URL_PATTERN = r"^data:image/[\w.+-]+(;[\w=.-]+)*;base64,"
#: custom string format: schemathesis hooks generate real images for it
DATA_URL_FORMAT = "image-data-url"
#: what a video URL the server decodes looks like (``data:video/mp4;base64,...``)
VIDEO_DATA_URL_PATTERN = r"^data:video/[\w.+-]+(;[\w=.-]+)*;base64,"
#: custom string format: schemathesis hooks generate real videos for it
VIDEO_DATA_URL_FORMAT = "video-data-url"
MAX_EMBED_INPUTS = 2048
MAX_TEXT = 100_000

MessageText = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_utf8)]
ModelId = Annotated[str, Field(min_length=1, max_length=256, description="an id from GET /v1/models")]
ImageUrlText = Annotated[
    str,
    Field(
        min_length=1,
        description="data:image/...;base64,... (http(s) only for hosts in IVL_ALLOWED_MEDIA_DOMAINS)",
        json_schema_extra={"format": DATA_URL_FORMAT},  # a pattern would make fuzzers skip the format
    ),
]

VideoUrlText = Annotated[
    str,
    Field(
        min_length=1,
        description="data:video/...;base64,... of a video file (mp4, mkv, webm, ...)",
        json_schema_extra={"format": VIDEO_DATA_URL_FORMAT},  # a pattern would make fuzzers skip the format
    ),
]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Closed):
    type: Literal["text"]
    text: MessageText


class ImageURL(_Closed):
    url: ImageUrlText
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted, ignored")
    max_dynamic_patch: Integer(ge=1, le=40) | None = Field(
        None, description="tiles for this image (LMDeploy's field); bounded by the server's limit"
    )


class ImagePart(_Closed):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Closed):
    url: VideoUrlText
    num_segments: Integer(ge=1, le=MAX_NUM_SEGMENTS) = Field(
        8, description="frames sampled from the video (the model cards' get_index)"
    )
    max_dynamic_patch: Integer(ge=1, le=40) | None = Field(
        None, description="tiles per frame (default 1, as the model cards); bounded by the server's limit"
    )


class VideoPart(_Closed):
    """vLLM's video content part; the question gets the model cards' ``Frame1: <image>\\n...`` prefix."""

    type: Literal["video_url"]
    video_url: VideoURL


UserPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
Name = Annotated[str, Field(max_length=256)]
TextParts = Annotated[list[TextPart], Field(min_length=1, max_length=64)]
UserParts = Annotated[list[UserPart], Field(min_length=1, max_length=64)]


class SystemMessage(_Closed):
    role: Literal["system"]
    content: MessageText | TextParts
    name: Name | None = None


class UserMessage(_Closed):
    role: Literal["user"]
    content: MessageText | UserParts
    name: Name | None = None


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: MessageText | TextParts
    name: Name | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]
Stop = Annotated[str, Field(min_length=1, max_length=1_000), AfterValidator(_utf8)]


class StreamOptions(_Closed):
    include_usage: bool = Field(False, strict=True)


class Retrieval(_Closed):
    """Extension: answer over the top ``k`` indexed images retrieved for the last user text."""

    k: Integer(ge=1, le=16) = 3


class ChatCompletionRequest(_Closed):
    """OpenAI ``chat.completions.create`` body. Omitted ``temperature`` means greedy decoding."""

    model: ModelId
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: Integer(ge=1, le=4096) | None = None
    max_completion_tokens: Integer(ge=1, le=4096) | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True, description="0 or absent: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    stop: Stop | Annotated[list[Stop], Field(min_length=1, max_length=4)] | None = None
    seed: Integer(ge=-MAX_ID, le=MAX_ID) | None = None
    n: Integer(ge=1, le=1) | None = Field(None, description="only 1")
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    user: Name | None = None
    retrieval: Retrieval | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    sources: list[Source] | None = Field(None, description="with 'retrieval': the images used")


def _embedding_branches(schema: dict[str, Any]) -> None:
    """Texts by default; ``modality: image`` takes data: URLs (what the validator below enforces)."""
    text = {"type": "string", "minLength": 1, "maxLength": 10_000}
    image = {"type": "string", "format": DATA_URL_FORMAT, "description": DATA_URL_PATTERN}

    def one_or_many(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "anyOf": [item, {"type": "array", "items": item, "minItems": 1, "maxItems": MAX_EMBED_INPUTS}]
        }

    schema["properties"]["input"] = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_EMBED_INPUTS},
        ],
        "description": "text(s), or data:image URL(s) with modality 'image'",
    }
    schema["oneOf"] = [
        {"properties": {"modality": {"const": "text"}, "input": one_or_many(text)}},
        {
            "required": ["modality"],
            "properties": {"modality": {"const": "image"}, "input": one_or_many(image)},
        },
    ]


class EmbeddingRequest(_Closed):
    """OpenAI ``embeddings.create`` body; ``modality`` (infinity's extension) selects texts or images."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_embedding_branches)

    model: ModelId
    input: str | list[str]
    modality: Literal["text", "image"] = "text"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Integer(ge=1, le=65_536) | None = Field(None, description="only the model's own")
    user: Name | None = None

    @model_validator(mode="after")
    def _check_inputs(self) -> EmbeddingRequest:
        import re

        items = [self.input] if isinstance(self.input, str) else self.input
        if not 1 <= len(items) <= MAX_EMBED_INPUTS:
            raise ValueError(f"input must have 1 to {MAX_EMBED_INPUTS} items")
        for item in items:
            if self.modality == "text":
                if not 1 <= len(item) <= 10_000:
                    raise ValueError("each text input must have 1 to 10000 characters")
                _utf8(item)
            elif re.match(DATA_URL_PATTERN, item) is None:
                raise ValueError("image inputs must be data:image/...;base64,... URLs")
        return self

    @property
    def items(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
