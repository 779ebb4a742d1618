"""Dependencies: the shared :class:`Service` and the optional API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.service import Service

_bearer = HTTPBearer(auto_error=False, description="API key as a Bearer token")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def get_service(request: Request) -> Service:
    """The app's :class:`Service` (set up by the lifespan)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_api_key(
    service: ServiceDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_api_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """401 unless the configured API key came as ``Authorization: Bearer`` or ``X-API-Key`` (no key: open)."""
    expected = service.settings.api_key
    if expected is None:
        return
    want = expected.get_secret_value().encode()
    for given in (bearer.credentials if bearer else None, x_api_key):
        if given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), want):
            return
    detail = (
        "invalid API key" if (bearer or x_api_key) else "missing API key (Authorization: Bearer or X-API-Key)"
    )
    raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


AuthDep = Depends(require_api_key)
