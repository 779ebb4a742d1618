"""Service settings: one pydantic-settings object, read from ``IVL_*`` environment variables or the CLI."""

from __future__ import annotations

import json
from typing import Annotated

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

    # micro-batching
    batching: bool = Field(True, description="micro-batch concurrent encode requests")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="longest wait to fill a batch")
    encoder_threads: int = Field(1, ge=1, le=64, description="worker threads running encoder calls")

    # index hot reload
    reload_interval_s: float = Field(1.0, ge=0.0, description="manifest.json check period; 0 = off")

    log_level: str = "info"

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        """Refuse an unknown precision name at start-up, with the accepted spellings."""
        if value is not None:
            parse_dtype(value)
        return value

    @field_validator("cors_origins", "image_roots", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        """Accept ``a,b`` as well as a JSON list (environment variables)."""
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value
