#!/usr/bin/env python
"""Thumbnail serving: a grid of N thumbnails fetched cold (rendered), warm (disk cache) and revalidated (304),
next to fetching the original files, side by side.

    python scripts/bench_thumbs.py [--n 100] [--photo-size 1600x1200] [--size 256] [--connections 6]

Writes ``--n`` JPEG photos (noise and gradients, so they do not compress to nothing) into a temporary folder,
indexes them with random vectors (no model: thumbnails need none), serves the app under uvicorn on
127.0.0.1 and fetches ``/thumbs/{id}?size=S`` for every id over ``--connections`` parallel connections
(a browser opens 6 per host). Printed: the wall time of the whole grid and per thumbnail for each pass,
bytes per thumbnail, and the ratios to the cold pass and to ``/images/{id}`` (the full files).
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image


def make_photos(folder: Path, n: int, width: int, height: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        base = rng.uniform(0, 255, 3).astype(np.float32)
        img = base + 60 * np.sin(xx / (40 + i) + yy / 70)[..., None] + rng.normal(0, 12, (height, width, 1))
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def make_index(index_dir: Path, root: Path, paths: list[Path]) -> list[int]:
    from index import Index

    vectors = np.random.default_rng(1).normal(size=(len(paths), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [{"path": str(p), "root": str(root), "relpath": p.name} for p in paths]
    with Index.create(index_dir, 16, model="bench", mode="internvl-c") as index:
        ids = index.add(vectors, rows)
        index.save()
    return [int(i) for i in ids]


def serve(index_dir: Path) -> tuple[uvicorn.Server, threading.Thread, str]:
    from api.app import create_app
    from api.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(Settings(index=str(index_dir), reload_interval_s=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def fetch_all(base: str, paths: list[str], connections: int, etags: dict[str, str] | None) -> dict:
    """GET every path over ``connections`` clients; returns wall seconds, bytes, statuses and ETags."""
    clients = [httpx.Client(base_url=base, timeout=120) for _ in range(connections)]
    got: dict[str, str] = {}
    sizes: list[int] = []
    statuses: list[int] = []

    def one(i: int) -> None:
        path = paths[i]
        headers = {"If-None-Match": etags[path]} if etags else {}
        r = clients[i % connections].get(path, headers=headers)
        statuses.append(r.status_code)
        sizes.append(len(r.content))
        got[path] = r.headers.get("etag", "")

    start = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(one, range(len(paths))))
    seconds = time.perf_counter() - start
    for c in clients:
        c.close()
    mean_bytes = sum(sizes) / len(sizes)
    return {"seconds": seconds, "bytes": mean_bytes, "statuses": sorted(set(statuses)), "etags": got}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--photo-size", default="1600x1200", help="WIDTHxHEIGHT of the generated photos")
    p.add_argument("--size", type=int, default=256, help="thumbnail size asked for")
    p.add_argument("--connections", type=int, default=6)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    width, height = (int(x) for x in args.photo_size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        photos = make_photos(work / "photos", args.n, width, height)
        ids = make_index(work / "index", work / "photos", photos)
        server, thread, base = serve(work / "index")
        try:
            thumbs = [f"/thumbs/{i}?size={args.size}" for i in ids]
            originals = [f"/images/{i}" for i in ids]
            runs = {
                "cold (render + cache)": fetch_all(base, thumbs, args.connections, None),
                "warm (disk cache)": fetch_all(base, thumbs, args.connections, None),
            }
            etags = runs["warm (disk cache)"]["etags"]
            runs["revalidate (304)"] = fetch_all(base, thumbs, args.connections, etags)
            runs["originals (/images)"] = fetch_all(base, originals, args.connections, None)
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    cold = runs["cold (render + cache)"]["seconds"]
    full = runs["originals (/images)"]["seconds"]
    print(f"{args.n} photos {width}x{height}, thumbnails size={args.size}, {args.connections} connections")
    head = f"{'pass':<24}{'grid s':>9}{'ms/thumb':>10}{'KB/item':>9}{'x cold':>8}{'x originals':>13}"
    print(head + "  statuses")
    report = {}
    for name, r in runs.items():
        s = r["seconds"]
        print(f"{name:<24}{s:>9.3f}{1000 * s / args.n:>10.2f}{r['bytes'] / 1024:>9.1f}"
              f"{s / cold:>8.2f}{s / full:>13.2f}  {r['statuses']}")  # fmt: skip
        report[name] = {"grid_s": round(s, 4), "ms_per_item": round(1000 * s / args.n, 3),
                        "bytes_per_item": round(r["bytes"])}  # fmt: skip
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
