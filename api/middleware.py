"""Request-body size limit answering a JSON 413, whether or not the client sent Content-Length."""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


def _message(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the streamed body passes the limit (handled as a JSON 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=_message(limit))


async def _send_413(send: Send, limit: int, path: str = "") -> None:
    if path.startswith("/v1/"):  # OpenAI clients read OpenAI's error envelope
        error = {"message": _message(limit), "type": "invalid_request_error", "param": None, "code": None}
        body = json.dumps({"error": error}).encode()
    else:
        body = json.dumps({"detail": _message(limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Rejects bodies over ``max_body_bytes``: at once from Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await _send_413(send, self.limit, scope.get("path", ""))
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:  # cannot change the status any more; the connection is closed by the server
                logger.warning("body limit hit after the response started")
                return
            await _send_413(send, self.limit, scope.get("path", ""))
