"""Admission control: bounded numbers of encode and chat requests in flight, 429 with Retry-After above."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException

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
