#!/usr/bin/env python
"""Load test of the API: N concurrent clients for T seconds, micro-batching on vs off, in one run.

    python scripts/bench_api.py --index DIR --model PATH [--clients 32] [--duration 10] [--kind text]
    python scripts/bench_api.py --model PATH            # builds a small temporary index first
    python scripts/bench_api.py --url http://127.0.0.1:8000 [--compare-url URL_WITHOUT_BATCHING]
    python scripts/bench_api.py --openai --model PATH --chat-model PATH [--url URL]

Without ``--url`` the script starts the server itself twice (``python -m api`` with ``--batching`` and
with ``--no-batching``) on free ports, measures both the same way and prints QPS, p50/p99 latency and
errors per mode and the batching / no-batching throughput ratio. ``--kind`` picks the request mix:
``text`` queries, ``image`` queries (small base64 PNGs) or ``mixed``.

``--openai`` measures the OpenAI dialect against our own endpoints on one server, in one run, with the
official ``openai`` client: streamed ``/v1/chat/completions`` with one image vs streamed ``/chat`` with
the same image, question and greedy token budget (requests/s, time to first token, p50/p99 latency), and
``/v1/embeddings`` of one text vs ``/search`` of that text; it prints the dialect / own p50 ratios (the
issue's bar: under 5 % extra at p50).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red green blue cat dog car tree house river mountain city night beach snow bird flower".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--compare-url", help="with --url: a second server (batching off) to compare against")
    p.add_argument("--index", help="index directory (default: a temporary index of generated images)")
    p.add_argument("--model", help="encoder checkpoint for the servers this script starts")
    p.add_argument("--api-key", help="API key to send (X-API-Key)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up traffic (default 2)")
    p.add_argument("--kind", choices=["text", "image", "mixed"], default="text", help="request mix")
    p.add_argument("--k", type=int, default=10, help="results per search")
    p.add_argument("--max-batch-size", type=int, default=32, help="server micro-batch size")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server micro-batch wait")
    p.add_argument("--device", help="server device (cpu, cuda)")
    p.add_argument("--openai", action="store_true", help="OpenAI client vs /chat and /search (see above)")
    p.add_argument("--chat-model", help="with --openai: the chat checkpoint of the server this script starts")
    p.add_argument("--chat-clients", type=int, default=2, help="with --openai: concurrent chat clients")
    p.add_argument("--max-tokens", type=int, default=16, help="with --openai: tokens per chat answer")
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give --url URL, or --model PATH (and optionally --index DIR) to start the servers")
    if args.openai and not args.url and not args.chat_model:
        p.error("--openai starts a server with --model PATH and --chat-model PATH (or give --url URL)")
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_bodies(kind: str, n: int, k: int) -> list[dict]:
    """``n`` distinct request bodies of the chosen kind."""
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(n):
        use_image = kind == "image" or (kind == "mixed" and i % 2)
        if use_image:
            bodies.append({"image": _png(i), "k": k})
        else:
            bodies.append({"text": " ".join(rng.choice(WORDS, size=4)) + f" {i}", "k": k})
    return bodies


def build_temp_index(model: str, folder: Path, n_images: int = 64) -> Path:
    """A small index of generated images, embedded with ``model``."""
    from index import Index
    from retrieval import load_encoder

    encoder = load_encoder(model)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(n_images)]
    paths = []
    for i, image in enumerate(images):
        path = folder / "images" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    index = Index.create(folder / "index", encoder.embed_dim, model=encoder.name, mode=encoder.mode)
    index.add(encoder.encode_images(images), [{"path": str(p)} for p in paths])
    index.save()
    index.close()
    return folder / "index"


@contextmanager
def start_server(args: argparse.Namespace, index: str, batching: bool, extra: Sequence[str] = ()):  # noqa: ANN201
    """``python -m api`` in a subprocess on a free port; yields its URL once /health says ready."""
    port = _free_port()
    cmd = [sys.executable, "-m", "api", "--index", index, "--model", args.model, "--port", str(port),
           "--batching" if batching else "--no-batching", "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
           "--reload-interval-s", "0", *extra]  # fmt: skip
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.api_key:
        env["IVL_API_KEY"] = args.api_key
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _client(client: httpx.AsyncClient, bodies: list[dict], offset: int, until: float,
                  latencies: list[float], errors: list[str]) -> None:  # fmt: skip
    i = offset
    while time.perf_counter() < until:
        body = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            r = await client.post("/search", json=body)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(str(r.status_code))
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)


async def measure(url: str, bodies: list[dict], clients: int, duration: float, warmup: float,
                  api_key: str | None) -> dict:  # fmt: skip
    """Run ``clients`` concurrent loops for ``duration`` seconds (after ``warmup``); returns the stats."""
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        if warmup > 0:
            until = time.perf_counter() + warmup
            await asyncio.gather(*(_client(client, bodies, i, until, [], []) for i in range(clients)))
        latencies: list[float] = []
        errors: list[str] = []
        start = time.perf_counter()
        until = start + duration
        await asyncio.gather(
            *(_client(client, bodies, i * 7, until, latencies, errors) for i in range(clients))
        )
        elapsed = time.perf_counter() - start
    lat_ms = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "qps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat_ms) else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat_ms) else float("nan"),
        "seconds": elapsed,
    }


def print_table(rows: list[tuple[str, dict]], args: argparse.Namespace) -> None:
    print(f"\n/search, kind={args.kind}, {args.clients} concurrent clients, {args.duration:.0f} s per mode")
    print(f"{'mode':<14}{'requests':>10}{'errors':>8}{'QPS':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, s in rows:
        print(
            f"{name:<14}{s['requests']:>10}{s['errors']:>8}{s['qps']:>10.1f}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}"
        )
    if len(rows) == 2 and rows[1][1]["qps"] > 0:
        on, off = rows[0][1], rows[1][1]
        p50_ratio = off["p50_ms"] / on["p50_ms"] if on["p50_ms"] > 0 else float("nan")
        print(f"batching on / off: QPS x{on['qps'] / off['qps']:.2f}, p50 latency x{p50_ratio:.2f} lower")


# ---------------------------------------------------------------------------------------------- --openai
#: one timed request: returns (time to first token or None, seconds in all)
Call = Callable[[int], Awaitable[tuple[float | None, float]]]


def _stats(ttft: list[float], latencies: list[float], errors: int, elapsed: float) -> dict:
    lat, first = np.asarray(latencies) * 1000.0, np.asarray(ttft) * 1000.0
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    return {
        "requests": len(latencies), "errors": errors, "qps": len(latencies) / elapsed,
        "ttft_p50_ms": pct(first, 50), "ttft_p99_ms": pct(first, 99),
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
    }  # fmt: skip


async def _drive(call: Call, clients: int, duration: float, warmup: float) -> dict:
    """``clients`` loops of ``call`` for ``duration`` seconds after ``warmup``."""
    ttft: list[float] = []
    latencies: list[float] = []
    errors: list[str] = []

    async def loop(offset: int, until: float, record: bool) -> None:
        i = offset
        while time.perf_counter() < until:
            i += 1
            try:
                first, total = await call(i)
            except Exception as exc:  # noqa: BLE001  (counted and reported; the benchmark goes on)
                errors.append(type(exc).__name__)
                continue
            if record:
                latencies.append(total)
                if first is not None:
                    ttft.append(first)

    if warmup > 0:
        until = time.perf_counter() + warmup
        await asyncio.gather(*(loop(c * 7, until, False) for c in range(clients)))
    start = time.perf_counter()
    await asyncio.gather(*(loop(c * 7, start + duration, True) for c in range(clients)))
    return _stats(ttft, latencies, len(errors), time.perf_counter() - start)


async def measure_openai(url: str, args: argparse.Namespace) -> list[tuple[str, dict]]:
    """OpenAI client vs our endpoints on one server: streamed chat with one image, then embeddings."""
    import openai

    key = args.api_key or "none"
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.clients, args.chat_clients) + 4)
    oa = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    own = httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers)
    models = [m.id for m in (await oa.models.list()).data]
    chat_id, encoder_id = models[0], models[-1]
    images = [_png(1000 + i) for i in range(8)]
    question = "Describe the image."

    async def v1_chat(i: int) -> tuple[float | None, float]:
        start, first = time.perf_counter(), None
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + images[i % len(images)]}},
            {"type": "text", "text": question},
        ]
        stream = await oa.chat.completions.create(
            model=chat_id, messages=[{"role": "user", "content": content}], stream=True,
            max_tokens=args.max_tokens, temperature=0,
        )  # fmt: skip
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        return first, time.perf_counter() - start

    async def v1_chat_raw(i: int) -> tuple[float | None, float]:
        """The same request without the openai client (httpx, as for our endpoints): the server's share."""
        start, first = time.perf_counter(), None
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + images[i % len(images)]}},
            {"type": "text", "text": question},
        ]
        body = {"model": chat_id, "messages": [{"role": "user", "content": content}], "stream": True,
                "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
        async with own.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if (
                    first is None
                    and line.startswith("data: {")
                    and '"content": "' in line
                    and '"content": ""' not in line
                ):
                    first = time.perf_counter() - start
        return first, time.perf_counter() - start

    async def own_chat(i: int) -> tuple[float | None, float]:
        start, first = time.perf_counter(), None
        body = {"question": question, "images": [images[i % len(images)]], "stream": True,
                "max_new_tokens": args.max_tokens}  # fmt: skip
        async with own.stream("POST", "/chat", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if first is None and line.startswith('data: {"text"'):
                    first = time.perf_counter() - start
        return first, time.perf_counter() - start

    texts = [" ".join(np.random.default_rng(i).choice(WORDS, size=4)) + f" {i}" for i in range(256)]

    async def v1_embed(i: int) -> tuple[float | None, float]:
        start = time.perf_counter()
        await oa.embeddings.create(model=encoder_id, input=texts[i % len(texts)])
        return None, time.perf_counter() - start

    async def v1_embed_raw(i: int) -> tuple[float | None, float]:
        start = time.perf_counter()
        body = {"model": encoder_id, "input": texts[i % len(texts)], "encoding_format": "base64"}
        r = await own.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})
        r.raise_for_status()
        return None, time.perf_counter() - start

    async def own_search(i: int) -> tuple[float | None, float]:
        start = time.perf_counter()
        (await own.post("/search", json={"text": texts[i % len(texts)], "k": args.k})).raise_for_status()
        return None, time.perf_counter() - start

    rows = []
    try:
        for name, call, clients in (
            ("/chat stream", own_chat, args.chat_clients),
            ("/v1 chat stream", v1_chat, args.chat_clients),
            ("/v1 chat (httpx)", v1_chat_raw, args.chat_clients),
            ("/search text", own_search, args.clients),
            ("/v1 embeddings", v1_embed, args.clients),
            ("/v1 embed (httpx)", v1_embed_raw, args.clients),
        ):
            rows.append((name, await _drive(call, clients, args.duration, args.warmup)))
    finally:
        await own.aclose()
        await oa.close()
    return rows


def print_openai_table(rows: list[tuple[str, dict]], args: argparse.Namespace) -> None:
    print(
        f"\nOpenAI dialect vs own endpoints: chat with one image, {args.max_tokens} tokens, "
        f"{args.chat_clients} chat clients; one-text embeddings / search, {args.clients} clients; "
        f"{args.duration:.0f} s each"
    )
    head = ("mode", "requests", "errors", "req/s", "TTFT p50", "TTFT p99", "p50 ms", "p99 ms")
    print(f"{head[0]:<18}" + "".join(f"{h:>10}" for h in head[1:]))
    for name, s in rows:
        print(
            f"{name:<18}{s['requests']:>10}{s['errors']:>10}{s['qps']:>10.1f}{s['ttft_p50_ms']:>10.1f}"
            f"{s['ttft_p99_ms']:>10.1f}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}"
        )
    by = dict(rows)
    pairs = [("/v1 chat stream", "/chat stream"), ("/v1 chat (httpx)", "/chat stream"),
             ("/v1 embeddings", "/search text"), ("/v1 embed (httpx)", "/search text")]  # fmt: skip
    print("openai rows: the official client (its parsing included); httpx rows: the same requests, raw")
    for dialect, ours in pairs:
        a, b = by[dialect], by[ours]
        ratio = a["p50_ms"] / b["p50_ms"] if b["p50_ms"] > 0 else float("nan")
        line = f"{dialect} / {ours}: p50 x{ratio:.3f} ({(ratio - 1) * 100:+.1f} %)"
        if a["ttft_p50_ms"] == a["ttft_p50_ms"] and b["ttft_p50_ms"] > 0:  # not NaN
            line += f", TTFT p50 x{a['ttft_p50_ms'] / b['ttft_p50_ms']:.3f}"
        line += f", req/s x{a['qps'] / b['qps']:.3f}" if b["qps"] > 0 else ""
        print(line + ("  (under 5 %)" if ratio < 1.05 else "  (OVER 5 %)"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.openai:
        if args.url:
            rows = asyncio.run(measure_openai(args.url, args))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                index = args.index or str(build_temp_index(args.model, Path(tmp)))
                with start_server(args, index, True, ["--chat-model", args.chat_model]) as url:
                    rows = asyncio.run(measure_openai(url, args))
        print_openai_table(rows, args)
        return 0
    bodies = make_bodies(args.kind, 256, args.k)
    run = lambda url: asyncio.run(  # noqa: E731
        measure(url, bodies, args.clients, args.duration, args.warmup, args.api_key)
    )
    rows: list[tuple[str, dict]] = []
    if args.url:
        rows.append(("server" if not args.compare_url else "batching on", run(args.url)))
        if args.compare_url:
            rows.append(("batching off", run(args.compare_url)))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            index = args.index or str(build_temp_index(args.model, Path(tmp)))
            for name, batching in (("batching on", True), ("batching off", False)):
                with start_server(args, index, batching) as url:
                    rows.append((name, run(url)))
    print_table(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
