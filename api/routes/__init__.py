"""One router module per resource."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

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


#: the value a multipart file part stands in for in the validated model (its bytes travel separately)
UPLOAD_MARK = "<multipart upload>"


def content_type(request: Request) -> str:
    """The request's media type, lower case, without parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_form(media: str) -> bool:
    return media in ("multipart/form-data", "application/x-www-form-urlencoded")


def require_json(media: str) -> None:
    """415 unless ``media`` is empty or JSON."""
    if media and media != "application/json" and not media.endswith("+json"):
        raise HTTPException(415, f"unsupported content type '{media}': send JSON or multipart/form-data")


def form_integer(value: str) -> int | str:
    """A numeric form field as int (JSON bodies carry numbers; form fields are text)."""
    try:
        return int(value.strip())
    except ValueError:
        return value  # refused by validation, with the field's name


def form_value(schema: dict[str, Any], key: str, value: str) -> Any:
    """A form field as the JSON type ``schema`` gives it; what does not parse is left for validation.
    ``null`` (JSON's null as form serialisations of OpenAPI bodies write it) is refused."""
    if value == "null":
        raise HTTPException(422, f"form field '{key}' must not be null")
    kind = schema["properties"][key].get("type")
    if kind == "integer":
        return form_integer(value)
    if kind == "boolean":
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    if kind == "number":
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


async def read_form(
    request: Request, schema: dict[str, Any], file_field: str, route: str
) -> tuple[dict[str, Any], bytes | None]:
    """A multipart body's fields (typed by ``schema``, the file part as :data:`UPLOAD_MARK`) and the bytes of
    its one ``file_field`` file, if sent as a file; unknown or repeated fields are 422."""
    try:
        form = await request.form(max_files=1, max_fields=len(schema["properties"]))
    except ValueError as exc:  # python-multipart's parse errors (older Starlette lets them through)
        raise HTTPException(400, f"malformed multipart body: {exc}") from exc
    fields: dict[str, Any] = {}
    raw: bytes | None = None
    for key, value in form.multi_items():
        if key in fields:
            raise HTTPException(422, f"form field '{key}' given more than once")
        if key not in schema["properties"]:
            detail = f"unexpected form field '{key}' (multipart {route} takes a {file_field})"
            raise HTTPException(422, detail)
        if isinstance(value, UploadFile):
            if key != file_field:
                raise HTTPException(422, f"unexpected file field '{key}' (only '{file_field}' is a file)")
            raw = await value.read()
            fields[key] = UPLOAD_MARK
        else:
            fields[key] = form_value(schema, key, value)
    return fields, raw
