#!/usr/bin/env python
"""Load test of the API: N concurrent clients for T seconds, micro-batching on vs off, in one run.

    python scripts/bench_api.py --index DIR --model PATH [--clients 32] [--duration 10] [--kind text]
    python scripts/bench_api.py --model PATH            # builds a small temporary index first
    python scripts/bench_api.py --url http://127.0.0.1:8000 [--compare-url URL_WITHOUT_BATCHING]

Without ``--url`` the script starts the server itself twice (``python -m api`` with ``--batching`` and
with ``--no-batching``) on free ports, measures both the same way and prints QPS, p50/p99 latency and
errors per mode and the batching / no-batching throughput ratio. ``--kind`` picks the request mix:
``text`` queries, ``image`` queries (small base64 PNGs) or ``mixed``.
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
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give --url URL, or --model PATH (and optionally --index DIR) to start the servers")
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
def start_server(args: argparse.Namespace, index: str, batching: bool):  # noqa: ANN201
    """``python -m api`` in a subprocess on a free port; yields its URL once /health says ready."""
    port = _free_port()
    cmd = [sys.executable, "-m", "api", "--index", index, "--model", args.model, "--port", str(port),
           "--batching" if batching else "--no-batching", "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
           "--reload-interval-s", "0"]  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
