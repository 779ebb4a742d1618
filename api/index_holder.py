"""The served index and its hot reload.

Requests take ``holder.current`` once and keep using that object, so in-flight searches finish on
the old index while a reload swaps the reference atomically. All index calls (open included) run on
one dedicated worker thread: SQLite connections stay on the thread that made them, and the event
loop never blocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def manifest_signature(index_dir: Path) -> str | None:
    """Content hash of ``manifest.json`` (None when missing or unreadable)."""
    try:
        return hashlib.sha256((index_dir / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


class IndexHolder:
    """Owns the current index object, opens new versions and swaps them in."""

    def __init__(self, index_dir: str | Path, opener: Callable[[Path], Any]) -> None:
        self.dir = Path(index_dir)
        self.opener = opener
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivl-index")
        self.current: Any = None
        self.signature: str | None = None
        self._reload_lock = asyncio.Lock()
        self._failed_signature: str | None = None
        #: called with a newly opened index before it is served; raising refuses it
        self.on_swap: Callable[[Any], None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking index call on the index thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def load(self) -> Any:
        """Open the index for the first time (errors propagate: the server must not start without it)."""
        signature = manifest_signature(self.dir)
        new = await self.run(self.opener, self.dir)
        if self.on_swap is not None:
            self.on_swap(new)
        self.current, self.signature = new, signature
        logger.info("index %s loaded: %d vectors", self.dir, len(self.current))
        return self.current

    async def reload(self, *, force: bool = True) -> bool:
        """Open the index again and swap it in; ``force=False`` only when the manifest changed.

        Returns whether a new index object is now served. A failed open keeps the old index and raises.
        """
        async with self._reload_lock:
            signature = manifest_signature(self.dir)
            if not force and signature in (None, self.signature, self._failed_signature):
                return False
            try:
                new = await self.run(self.opener, self.dir)
                if self.on_swap is not None:
                    self.on_swap(new)  # may refuse the new index (raises) before it is served
            except Exception:
                self._failed_signature = signature  # retry only once the manifest changes again
                raise
            old, self.current, self.signature = self.current, new, signature
            logger.info(
                "index %s reloaded: %d -> %d vectors", self.dir, len(old) if old is not None else 0, len(new)
            )
            return True

    async def watch(
        self,
        interval_s: float,
        on_error: Callable[[Exception], None] | None = None,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        """Poll the manifest every ``interval_s`` seconds and reload when its contents change."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await self.reload(force=False) and on_reload is not None:
                    on_reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a half-written or broken index: keep serving the old one
                logger.warning("index reload from %s failed, keeping the current index: %s", self.dir, exc)
                if on_error is not None:
                    on_error(exc)

    def close(self) -> None:
        """Stop the index thread."""
        self.executor.shutdown(wait=False, cancel_futures=True)
