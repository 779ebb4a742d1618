"""Micro-batcher: batches concurrent requests, maps rows back, survives errors, never blocks the loop."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_helpers import FakeEncoder, serve

from api.app import create_app
from api.batching import MicroBatcher
from api.settings import Settings


def _identity_rows(calls: list[int], fail_on: object = None):  # noqa: ANN202
    def fn(items):  # noqa: ANN001, ANN202
        calls.append(len(items))
        if fail_on in items:
            raise ValueError("boom")
        return np.asarray([[float(x)] for x in items], dtype=np.float32)

    return fn


def _run(coro):  # noqa: ANN001, ANN202
    return asyncio.run(coro)


@pytest.mark.parametrize("max_batch,expected_calls", [(32, [10]), (4, [4, 4, 2])])
def test_concurrent_items_share_batches_and_get_their_own_row(
    max_batch: int, expected_calls: list[int]
) -> None:
    calls: list[int] = []

    async def scenario() -> list[float]:
        b = MicroBatcher(
            _identity_rows(calls), ThreadPoolExecutor(1), name="t", max_batch_size=max_batch, max_wait_ms=50
        )
        await b.start()
        out = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.stop()
        return [float(r[0]) for r in out]

    assert _run(scenario()) == [float(i) for i in range(10)]
    assert calls == expected_calls


def test_failed_batch_reaches_every_caller_and_batcher_recovers() -> None:
    calls: list[int] = []

    async def scenario() -> tuple[list, float]:
        b = MicroBatcher(_identity_rows(calls, fail_on=3), ThreadPoolExecutor(1), name="t", max_wait_ms=20)
        await b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(5)), return_exceptions=True)
        after = await b.submit(7)
        await b.stop()
        return results, float(after[0])

    results, after = _run(scenario())
    assert all(isinstance(r, ValueError) for r in results)
    assert after == 7.0


def test_cancelled_caller_is_dropped() -> None:
    calls: list[int] = []

    async def scenario() -> list[float]:
        b = MicroBatcher(_identity_rows(calls), ThreadPoolExecutor(1), name="t", max_wait_ms=50)
        await b.start()
        tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
        await asyncio.sleep(0.005)
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await b.stop()
        return [float(r[0]) for r in done if not isinstance(r, BaseException)]

    assert _run(scenario()) == [0.0, 2.0, 3.0]
    assert calls == [3]


def test_disabled_batcher_calls_one_by_one() -> None:
    calls: list[int] = []

    async def scenario() -> None:
        b = MicroBatcher(_identity_rows(calls), ThreadPoolExecutor(1), name="t", enabled=False)
        await b.start()
        await asyncio.gather(*(b.submit(i) for i in range(5)))
        await b.stop()

    _run(scenario())
    assert calls == [1, 1, 1, 1, 1]


async def _concurrent_searches(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        rs = await asyncio.gather(
            *(client.post("/search", json={"text": f"query {i}", "k": 2}) for i in range(n))
        )
    return [r.status_code for r in rs]


@pytest.mark.parametrize("batching", [True, False])
def test_http_requests_are_micro_batched(fake_index_dir: Path, batching: bool) -> None:
    encoder = FakeEncoder(delay_s=0.02)
    settings = Settings(index=str(fake_index_dir), batching=batching, max_wait_ms=10, reload_interval_s=0)
    with serve(create_app(settings, encoder=encoder)) as url:
        assert asyncio.run(_concurrent_searches(url, 16)) == [200] * 16
        metrics = httpx.get(url + "/metrics").text
    sizes = [n for kind, n in encoder.calls if kind == "text"]
    assert sum(sizes) == 16
    if batching:
        assert max(sizes) > 1 and len(sizes) < 16
    else:
        assert sizes == [1] * 16
    assert 'ivl_encoder_batch_size_sum{kind="text"} 16.0' in metrics


def test_inference_does_not_block_the_event_loop(fake_index_dir: Path) -> None:
    encoder = FakeEncoder(delay_s=1.5)
    settings = Settings(index=str(fake_index_dir), reload_interval_s=0)
    with serve(create_app(settings, encoder=encoder)) as url:

        async def scenario() -> tuple[bool, float]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                slow = asyncio.create_task(client.post("/search", json={"text": "slow"}))
                await asyncio.sleep(0.2)  # the encoder thread is now busy for 1.5 s
                start = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                took = time.perf_counter() - start
                answered_while_busy = not slow.done()
                assert (await slow).status_code == 200
                return answered_while_busy, took

        answered_while_busy, took = asyncio.run(scenario())
        assert answered_while_busy and took < 1.0
