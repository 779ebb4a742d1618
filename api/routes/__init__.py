"""One router module per resource."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from api.schemas import ErrorResponse

M = TypeVar("M", bound=BaseModel)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the JSON errors a route can answer."""
    return {
        code: {
            "model": ErrorResponse,
            "description": _DESCRIPTIONS.get(code, "error"),
            **({"headers": {"Retry-After": {"schema": {"type": "string"}}}} if code == 429 else {}),
        }
        for code in codes
    }


_DESCRIPTIONS = {
    400: "malformed request body",
    401: "missing or wrong API key",
    404: "unknown id",
    413: "request body too large",
    415: "unsupported content type",
    422: "invalid request: bad field, undecodable image or image over the pixel limit",
    429: "overloaded: too many requests in flight; retry after Retry-After seconds",
    503: "model or index not configured",
}


def body_with_upload(
    json_schema: dict[str, Any], multipart_schema: dict[str, Any], file_field: str, media: str
) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: JSON, or multipart with one file part."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_schema},
                "multipart/form-data": {
                    "schema": multipart_schema,
                    "encoding": {file_field: {"contentType": media}},
                },
            },
        }
    }


def validate_body(model: type[M], data: dict[str, Any] | bytes) -> M:
    """A JSON body (bytes) or parsed form fields as ``model``; errors as FastAPI's 422."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from exc
