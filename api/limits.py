"""Admission control: bounded numbers of encode and chat requests in flight, 429 with Retry-After above;
work of a client that has disconnected is dropped before it reaches the model."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
#: how often a waiting request checks whether its client is still there
DISCONNECT_POLL_S = 0.05

logger = logging.getLogger(__name__)


class Gate:
    """Counts requests of one kind in flight (event-loop only); refuses at once when ``limit`` are."""

    def __init__(self, name: str, limit: int, retry_after_s: int = 1) -> None:
        self.name = name
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self.refused = 0
        self.peak = 0

    def acquire(self) -> None:
        """Take a slot or raise a 429 with ``Retry-After``."""
        if self.inflight >= self.limit:
            self.refused += 1
            raise HTTPException(
                429,
                f"overloaded: {self.inflight} {self.name} requests in flight (limit {self.limit});"
                " retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)

    def release(self) -> None:
        """Give a slot back."""
        self.inflight = max(self.inflight - 1, 0)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """A slot for the duration of the block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()


class ClientDisconnected(HTTPException):
    """The client went away while its work was queued; the work was dropped (nobody reads this answer)."""

    def __init__(self) -> None:
        super().__init__(400, "client disconnected")


async def watch_disconnect(
    request: Request, cancelled: threading.Event, interval_s: float = DISCONNECT_POLL_S
) -> None:
    """Set ``cancelled`` once the client of ``request`` has disconnected."""
    while not cancelled.is_set():
        if await request.is_disconnected():
            cancelled.set()
            return
        await asyncio.sleep(interval_s)


async def watching(request: Request, cancelled: threading.Event, work: Awaitable[T]) -> T:
    """Await thread work that checks ``cancelled`` itself (a started thread cannot be cancelled), setting it
    when the client disconnects."""
    watcher = asyncio.create_task(watch_disconnect(request, cancelled))
    try:
        return await work
    finally:
        watcher.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (queued batcher / executor work); when the client disconnects first, cancel it, so
    that what is still queued never reaches the model, and raise :class:`ClientDisconnected`."""
    task = asyncio.ensure_future(work)
    cancelled = threading.Event()
    watcher = asyncio.create_task(watch_disconnect(request, cancelled))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            logger.info("client of %s went away: its queued work was dropped", request.url.path)
            raise ClientDisconnected()
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def on_thread(cancelled: threading.Event, fn: Callable[..., T], *args: object) -> T:
    """Worker thread: run ``fn`` unless the client disconnected while it was queued."""
    if cancelled.is_set():
        raise ClientDisconnected()
    return fn(*args)


class GatedStreamingResponse(StreamingResponse):
    """A streamed answer holding a gate slot until it is finished or abandoned (even before its body
    iterator started, whose own ``finally`` would then never run)."""

    def __init__(self, content: object, gate: Gate, **kwargs: object) -> None:
        super().__init__(content, **kwargs)  # type: ignore[arg-type]
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gate.release()
