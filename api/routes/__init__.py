"""One router module per resource."""

from __future__ import annotations

from typing import Any

from api.schemas import ErrorResponse


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
