"""Bounded queues on /search, /classify and /chat: 429 with Retry-After when full, work of a client that
disconnected is dropped before it reaches the model, the server keeps serving a flood with bounded memory
and recovers at once; grounded /chat retrieves through the batcher and the index thread with the same
answers; /classify encodes its prompts through the batcher in chunks with the same results."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_helpers import FakeEncoder, b64, png_bytes, serve

from api.app import create_app
from api.settings import Settings
from retrieval.zero_shot import classify as zero_shot


def rss_bytes() -> int:
    """This process's resident set size (psutil when installed, else /proc/self/status VmRSS), after a
    garbage collection and, with glibc, handing freed heap pages back (so it counts what is kept)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise
    return int(psutil.Process().memory_info().rss)


class RecordingEncoder(FakeEncoder):
    """The fake encoder, remembering every text it encoded."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.texts: list[str] = []

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.texts.extend(texts)
        return super().encode_texts(texts, batch_size)


class SlowChat:
    """A chat model whose answers take ``delay_s``; records the questions it was asked."""

    name = "slow-chat"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.questions: list[str] = []

    def chat(self, question: str, images=None, **kwargs) -> str:  # noqa: ANN001, ANN003
        self.questions.append(question)
        time.sleep(self.delay_s)
        return f"answer to {question}"


def _post_then_leave(url: str, body: dict, after_s: float) -> None:
    """POST ``body`` and hang up after ``after_s`` seconds, before the answer comes."""
    with httpx.Client(timeout=after_s) as client, pytest.raises(httpx.TimeoutException):
        client.post(url, json=body)


def _wait_until(done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _in_background(url: str, body: dict) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(httpx.post(url, json=body, timeout=30)))
    thread.start()
    return thread, out


@pytest.mark.parametrize("batching", [True, False])
def test_v1_embeddings_drop_work_of_a_client_that_left_mid_queue(batching: bool) -> None:
    encoder = RecordingEncoder(delay_s=0.6)
    settings = Settings(model="fake", reload_interval_s=0, batching=batching, encoder_threads=1)
    with serve(create_app(settings, encoder=encoder)) as base:
        first, answers = _in_background(f"{base}/v1/embeddings", {"model": "fake", "input": "busy"})
        _wait_until(
            lambda: "busy" in encoder.texts
        )  # "busy" holds the encoder thread; the next query queues behind it
        _post_then_leave(f"{base}/v1/embeddings", {"model": "fake", "input": "gone-v1"}, after_s=0.2)
        first.join()
        assert answers[0].status_code == 200
        time.sleep(0.3)
        assert "busy" in encoder.texts and "gone-v1" not in encoder.texts


@pytest.fixture
def search_server(fake_index_dir: Path):  # noqa: ANN201
    def start(encoder: FakeEncoder, **kwargs: object):  # noqa: ANN202
        settings = Settings(index=str(fake_index_dir), model="fake", reload_interval_s=0, **kwargs)
        return serve(create_app(settings, encoder=encoder))

    return start


@pytest.mark.parametrize("batching", [True, False])
@pytest.mark.parametrize("route", ["/search", "/classify"])
def test_encode_routes_drop_work_of_a_client_that_left_mid_queue(
    search_server,
    batching: bool,
    route: str,  # noqa: ANN001
) -> None:
    encoder = RecordingEncoder(delay_s=0.6)
    with search_server(encoder, batching=batching, encoder_threads=1) as base:
        busy, answers = _in_background(f"{base}/search", {"text": "busy"})
        _wait_until(
            lambda: "busy" in encoder.texts
        )  # "busy" holds the encoder thread; the next request queues behind it
        if route == "/search":
            body: dict = {"text": "gone"}
        else:
            body = {"image_id": 0, "labels": ["gone", "left"], "templates": ["{}"]}
        _post_then_leave(base + route, body, after_s=0.2)
        busy.join()
        assert answers[0].status_code == 200, answers[0].text
        time.sleep(0.3)  # the encoder thread is free: anything still queued would run now
        assert "busy" in encoder.texts
        assert not {"gone", "left"} & set(encoder.texts), encoder.texts
        assert httpx.post(f"{base}/search", json={"text": "after"}, timeout=10).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_chat_drops_work_of_a_client_that_left_mid_queue(stream: bool) -> None:
    chat = SlowChat(delay_s=0.6)
    settings = Settings(reload_interval_s=0)
    with serve(create_app(settings, chat_model=chat)) as base:
        image = [b64(png_bytes())]
        busy, answers = _in_background(f"{base}/chat", {"question": "busy", "images": image})
        _wait_until(
            lambda: "busy" in chat.questions
        )  # "busy" holds the chat thread; the next question queues behind it
        body = {"question": "gone", "images": image, "stream": stream}
        _post_then_leave(f"{base}/chat", body, after_s=0.2)
        busy.join()
        assert answers[0].status_code == 200 and answers[0].json()["answer"] == "answer to busy"
        time.sleep(0.3)
        assert chat.questions == ["busy"]  # "gone" never reached the model
        assert (
            httpx.post(f"{base}/chat", json={"question": "after", "images": image}, timeout=10).status_code
            == 200
        )


def test_chat_answers_429_when_its_queue_is_full() -> None:
    chat = SlowChat(delay_s=0.4)
    settings = Settings(reload_interval_s=0, max_queued_chats=1)
    with serve(create_app(settings, chat_model=chat)) as base:
        body = {"question": "busy", "images": [b64(png_bytes())]}
        busy, answers = _in_background(f"{base}/chat", body)
        _wait_until(lambda: "busy" in chat.questions)
        refused = httpx.post(f"{base}/chat", json={**body, "question": "refused"}, timeout=10)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert "overloaded" in refused.json()["detail"]
        busy.join()
        assert answers[0].status_code == 200
        assert httpx.post(f"{base}/chat", json=body, timeout=10).status_code == 200  # at once again
        assert "refused" not in chat.questions


async def _flood(
    base: str, bodies: list[dict], total: int, concurrency: int
) -> tuple[list[int], list[float]]:
    """``total`` POST /search requests, ``concurrency`` at a time; also probes /health meanwhile."""
    codes: list[int] = []
    health_s: list[float] = []
    queue = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in queue:
                r = await client.post("/search", json=bodies[i % len(bodies)])
                codes.append(r.status_code)

        async def probe() -> None:
            while len(codes) < total:
                start = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                health_s.append(time.perf_counter() - start)
                await asyncio.sleep(0.05)

        await asyncio.gather(probe(), *(worker() for _ in range(concurrency)))
    return codes, health_s


def test_search_overload_answers_429_keeps_serving_bounded_memory_recovers(fake_index_dir: Path) -> None:
    encoder = FakeEncoder(delay_s=0.01)
    limit = 4
    settings = Settings(
        index=str(fake_index_dir), model="fake", reload_interval_s=0, max_queued_encodes=limit,
        max_batch_size=4,
    )  # fmt: skip
    app = create_app(settings, encoder=encoder)
    rng = np.random.default_rng(0)
    # ~260 KB of base64 per image query: a server that kept every request would grow by total x that
    noisy = [b64(png_bytes_noise(rng)) for _ in range(4)]
    bodies = [{"image": img, "k": 3} for img in noisy] + [{"text": f"query {i}", "k": 3} for i in range(4)]
    total, concurrency = 600, 48
    sent = sum(len(b.get("image", "")) for b in bodies) * total // len(bodies)
    with serve(app) as base:
        for body in bodies:  # warm up: every code path once
            assert httpx.post(f"{base}/search", json=body, timeout=30).status_code == 200
        floods = [asyncio.run(_flood(base, bodies, total, concurrency))]  # warms arenas, threads up
        before = rss_bytes()
        floods += [asyncio.run(_flood(base, bodies, total, concurrency)) for _ in range(2)]
        after = rss_bytes()
        for codes, _ in floods:
            assert len(codes) == total and set(codes) <= {200, 429}, set(codes)
            assert codes.count(429) > 0 and codes.count(200) > 0  # pushed back, and kept serving
        service = app.state.service
        assert service.encode_gate.peak <= limit and service.encode_gate.inflight == 0
        assert max(t for _, health_s in floods for t in health_s) < 5.0  # the event loop stayed responsive
        # kept request bodies would grow RSS by ~`sent` per flood; the steady state stays flat
        mib, sent_twice = 2**20, 2 * sent
        assert after - before < min(32 * mib, sent_twice // 4), (
            f"RSS grew {(after - before) / mib:.1f} MiB over two floods ({sent_twice / mib:.0f} MiB sent)"
        )
        for body in bodies:  # recovered as soon as the flood stopped
            assert httpx.post(f"{base}/search", json=body, timeout=30).status_code == 200


def png_bytes_noise(rng: np.random.Generator, side: int = 256) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_classify_encodes_prompts_in_batcher_chunks_with_identical_results(fake_index_dir: Path) -> None:
    encoder = FakeEncoder()
    settings = Settings(index=str(fake_index_dir), model="fake", reload_interval_s=0, max_batch_size=8)
    labels = [f"label {i}" for i in range(10)]
    templates = ["a photo of a {}.", "a {} drawing", "{}"]
    with serve(create_app(settings, encoder=encoder)) as base:
        image = png_bytes((20, 14), (10, 200, 30))
        encoder.calls.clear()
        r = httpx.post(
            f"{base}/classify",
            json={"image": b64(image), "labels": labels, "templates": templates},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        text_calls = [n for kind, n in encoder.calls if kind == "text"]
        assert sum(text_calls) == len(labels) * len(templates) and max(text_calls) <= 8
        from retrieval.images import open_image

        expected = zero_shot(encoder, [open_image(image)], labels, templates)[0]
        got = {s["label"]: s["score"] for s in r.json()["scores"]}
        assert [got[x] for x in labels] == [float(p) for p in expected]


def test_classify_real_encoder_chunks_match_zero_shot(real_index_dir: Path, real_encoder) -> None:  # noqa: ANN001
    settings = Settings(
        index=str(real_index_dir), reload_interval_s=0, max_batch_size=8, max_pixels=1_000_000
    )
    labels = ["cat", "dog", "red square", "blue circle", "voiture", "猫", "a tree"]
    templates = ["a photo of a {}.", "{}", "a drawing of a {}"]
    with serve(create_app(settings, encoder=real_encoder)) as base:
        image = png_bytes((32, 32), (220, 20, 20))
        r = httpx.post(
            f"{base}/classify",
            json={"image": b64(image), "labels": labels, "templates": templates},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    from retrieval.images import open_image

    expected = zero_shot(real_encoder, [open_image(image)], labels, templates)[0]
    got = {s["label"]: s["score"] for s in r.json()["scores"]}
    np.testing.assert_allclose([got[x] for x in labels], expected, rtol=0, atol=1e-6)


def test_grounded_chat_answers_equal_grounded_answer(
    real_url: str, real_index_dir: Path, real_encoder, chat_model
) -> None:  # noqa: ANN001
    from chat import grounded
    from index import Index

    question = "Which image is red?"
    index = Index.open(real_index_dir)
    try:
        expected = grounded.answer(
            question, index=index, encoder=real_encoder, chat_model=chat_model, k=2, max_new_tokens=6
        )
    finally:
        index.close()
    r = httpx.post(f"{real_url}/chat", json={"question": question, "k": 2, "max_new_tokens": 6}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == expected["answer"]
    assert [s["id"] for s in body["sources"]] == [s["id"] for s in expected["sources"]]
    np.testing.assert_allclose(
        [s["score"] for s in body["sources"]], [s["score"] for s in expected["sources"]], rtol=0, atol=1e-6
    )
    streamed = httpx.post(
        f"{real_url}/chat", json={"question": question, "k": 2, "max_new_tokens": 6, "stream": True},
        timeout=120,
    )  # fmt: skip
    text = "".join(
        json.loads(line[6:])["text"]
        for line in streamed.text.splitlines()
        if line.startswith("data: ") and '"text"' in line
    )
    assert text == expected["answer"]
