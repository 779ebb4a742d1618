"""Micro-batching of concurrent encode requests (the infinity / LitServe pattern).

Requests queue up on the event loop; one collector task takes the first waiting item, gathers more
for at most ``max_wait_ms`` or until ``max_batch_size`` items, and runs ONE batched call in a worker
thread. While that call runs, new requests keep queueing, so under load batches fill by themselves.
The event loop never blocks on inference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[Any]], np.ndarray]


class MicroBatcher:
    """Collects single items into batches for ``fn(items) -> (N, D)`` and hands each caller its row.

    With ``enabled=False`` every item is its own call (the baseline the benchmark compares against);
    calls still go through the same executor, so the event loop stays free either way.
    """

    def __init__(
        self,
        fn: BatchFn,
        executor: Executor,
        *,
        name: str,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.fn = fn
        self.executor = executor
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.enabled = enabled
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the collector task on the running loop (call from the app lifespan)."""
        if self.enabled and self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._collect_forever(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Cancel the collector; callers still waiting get a ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError(f"{self.name} batcher stopped"))

    async def submit(self, item: Any) -> np.ndarray:
        """Encode one item; returns its row ``(D,)``."""
        loop = asyncio.get_running_loop()
        if not self.enabled or self._queue is None:
            out = await loop.run_in_executor(self.executor, self._run, [item])
            return out[0]
        fut: asyncio.Future = loop.create_future()
        await self._queue.put((item, fut))
        return await fut

    async def submit_many(self, items: Sequence[Any]) -> np.ndarray:
        """Encode several items ``(N, D)``, in chunks of at most ``max_batch_size``: each chunk's items join
        the queue together (other requests' items interleave between chunks); unbatched, one call each."""
        loop = asyncio.get_running_loop()
        rows: list[np.ndarray] = []
        for start in range(0, len(items), self.max_batch_size):
            chunk = list(items[start : start + self.max_batch_size])
            if not self.enabled or self._queue is None:
                rows.extend(await loop.run_in_executor(self.executor, self._run, chunk))
            else:
                rows.extend(await asyncio.gather(*(self.submit(item) for item in chunk)))
        if not rows:
            raise ValueError(f"{self.name}: nothing to encode")
        return np.stack(rows)

    def _run(self, items: Sequence[Any]) -> np.ndarray:
        out = self.fn(items)
        if self.on_batch is not None:
            self.on_batch(self.name, len(items))
        if len(out) != len(items):
            raise RuntimeError(f"{self.name}: batch function returned {len(out)} rows for {len(items)} items")
        return out

    async def _collect_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # take whatever is already waiting, without waiting longer
                    while len(batch) < self.max_batch_size and not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled callers
            if not live:
                continue
            try:
                out = await loop.run_in_executor(self.executor, self._run, [item for item, _ in live])
            except asyncio.CancelledError:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"{self.name} batcher stopped"))
                raise
            except Exception as exc:  # the whole batch failed: every caller sees the error
                logger.exception("%s batch of %d failed", self.name, len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for row, (_, fut) in zip(out, live, strict=True):
                if not fut.done():
                    fut.set_result(row)
