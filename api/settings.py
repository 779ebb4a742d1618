"""Service settings: one pydantic-settings object, read from ``IVL_*`` environment variables or the CLI."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retrieval.devices import parse_dtype
from retrieval.images import DEFAULT_MAX_PIXELS


class Settings(BaseSettings):
    """Everything the service needs to start. Environment variables use the ``IVL_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="IVL_", env_file=None, extra="ignore")

    # models and data
    index: str | None = Field(None, description="index directory (holds manifest.json)")
    model: str | None = Field(None, description="encoder checkpoint path (or 'demo')")
    chat_model: str | None = Field(None, description="InternVL-Chat checkpoint; /chat answers 503 without it")
    device: str | None = Field(None, description="torch device, e.g. cpu, cuda, cuda:1 (default: auto)")
    dtype: str | None = Field(
        None,
        description="model dtype: float32/fp32, float16/fp16/half, bfloat16/bf16 or auto (default: auto, "
        "bf16 on GPUs with native bf16, fp16 on older GPUs, float32 on CPU)",
    )
    load_in: Literal["8bit", "4bit"] | None = Field(
        None, description="load the chat model's language model in 8 or 4 bit (bitsandbytes, CUDA only)"
    )
    device_map: str | dict[str, str | int] | None = Field(
        None,
        description="chat model placement: auto, balanced, sequential, a device, or a JSON module->device "
        "map (default: one device, 'auto' when the model does not fit on it and more GPUs follow)",
    )

    # network and security
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="when set, required as Bearer token or X-API-Key")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins; empty = CORS off"
    )
    image_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="extra allowed roots for /images (default: the index manifest's roots)",
    )

    # limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="request body limit (413 above)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="decoded image pixel limit (422 above)")
    max_k: int = Field(1000, ge=1, le=1000)
    max_video_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="video file size limit of /chat (413 above)"
    )
    max_video_duration_s: float = Field(
        600.0, gt=0.0, description="video duration limit of /chat in seconds (422 above)"
    )
    max_video_frames: int = Field(
        36_000, ge=1, description="limit on a /chat video's frame count (422 above)"
    )

    # micro-batching
    batching: bool = Field(True, description="micro-batch concurrent encode requests")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="longest wait to fill a batch")
    encoder_threads: int = Field(1, ge=1, le=64, description="worker threads running encoder calls")

    # index hot reload
    reload_interval_s: float = Field(1.0, ge=0.0, description="manifest.json check period; 0 = off")

    # OpenAI-compatible API (/v1) and overload protection
    served_model_name: str | None = Field(
        None, description="chat model id on /v1 (default: the chat model folder's name; 'demo' for demo)"
    )
    served_encoder_name: str | None = Field(
        None, description="encoder model id on /v1 (default: the encoder folder's name)"
    )
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts whose http(s) image URLs /v1 may fetch; empty = none"
    )
    media_fetch_timeout_s: float = Field(10.0, gt=0.0, le=300.0, description="image URL fetch timeout")
    max_queued_encodes: int = Field(256, ge=1, description="encode requests in flight (429 above)")
    max_queued_chats: int = Field(32, ge=1, description="chat requests in flight or waiting (429 above)")
    max_images_per_request: int = Field(16, ge=1, le=1024, description="images in one chat request")
    max_tiles_per_request: int = Field(256, ge=1, description="image tiles in one chat request")
    max_dynamic_patch_limit: int = Field(
        12, ge=1, le=40, description="ceiling of image_url.max_dynamic_patch"
    )
    max_tokens_limit: int = Field(4096, ge=1, description="ceiling of max_tokens per chat request")

    log_level: str = "info"

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        """Refuse an unknown precision name at start-up, with the accepted spellings."""
        if value is not None:
            parse_dtype(value)
        return value

    @field_validator("device_map", mode="before")
    @classmethod
    def _parse_device_map(cls, value: object) -> object:
        """A JSON object string (``IVL_DEVICE_MAP='{"": "cuda:1"}'``) becomes a dict; other strings stay."""
        if isinstance(value, str) and value.strip().startswith("{"):
            return json.loads(value)
        return value

    @field_validator("cors_origins", "image_roots", "allowed_media_domains", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        """Accept ``a,b`` as well as a JSON list (environment variables)."""
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value
