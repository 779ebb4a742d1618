#!/usr/bin/env python
"""build_index throughput against the encoder's raw ``encode_pixels`` rate, on the same model, in one run.

    python scripts/bench_build.py [--n 256] [--size 1600x1200] [--batch-size 32] [--workers N] [--device cpu]
        [--engine local|ray] [--shard-size N] [--ray-address ADDR]

The model is an OpenCLIP ViT-B-32 with random weights (same compute as real weights), saved in the
OpenCLIP folder layout and loaded through ``retrieval.load_encoder``. The folder holds ``--n``
generated photo-like JPEGs. Printed: raw encode images/s (ready tensors, no I/O), single-process
decode+preprocess images/s, build_index images/s (walk, decode in workers, encode, write, commits)
and the ratio build / raw; near 1 means decoding is hidden behind encoding. ``--engine ray`` also builds
the same folder with the Ray engine (a local Ray instance on the same cores unless ``--ray-address``)
and prints ray / local: the engine's overhead on one machine (start-up, actors, shard files, merge).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from index.builder import build_index
from retrieval import load_encoder
from retrieval.images import open_image


def make_model(folder: Path, arch: str = "ViT-B-32") -> Path:
    """Random-weight OpenCLIP model in the folder layout ``load_encoder`` reads."""
    if (folder / "open_clip_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    config = {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder


def make_photos(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, shapes, sensor noise; quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx / width * rng.uniform(0.2, 1) + yy / height * rng.uniform(0.2, 1))[..., None] / 2
        img = c0 * (1 - t) + c1 * t
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.1, 0.4) * height
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def raw_encode_rate(encoder, paths: list[Path], n: int, batch_size: int) -> float:  # noqa: ANN001
    """Images/s of ``encode_pixels`` alone on ready, preprocessed batches."""
    batch = torch.stack([encoder.preprocess(open_image(p)) for p in paths[:batch_size]])
    encoder.encode_pixels(batch)  # warm-up
    done, start = 0, time.perf_counter()
    while done < n:
        encoder.encode_pixels(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def decode_rate(encoder, paths: list[Path], n: int = 32) -> float:  # noqa: ANN001
    """Images/s of reading + decoding + preprocessing in one process."""
    start = time.perf_counter()
    for p in paths[:n]:
        encoder.image_transform(open_image(p.read_bytes()))
    return min(n, len(paths)) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="number of JPEGs")
    p.add_argument("--size", default="1600x1200", help="JPEG size WxH")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: build_index's)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--workdir", default=None, help="keeps the model and photos between runs")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: both engines, ratio")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard (ray)")
    p.add_argument("--ray-address", default=None)
    args = p.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_build_"))
    model_dir = make_model(work / "vit-b-32-random")
    paths = make_photos(work / f"photos_{width}x{height}", args.n, width, height)
    encoder = load_encoder(model_dir, device=args.device, dtype=args.dtype)
    print(f"model ViT-B-32 (random weights) on {encoder.device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs; {args.n} JPEGs {width}x{height}, batch {args.batch_size}")  # fmt: skip

    raw_before = raw_encode_rate(encoder, paths, args.n, args.batch_size)
    dec = decode_rate(encoder, paths)
    index_dir = Path(tempfile.mkdtemp(prefix="index_", dir=work))
    report = build_index([paths[0].parent], index_dir, encoder, batch_size=args.batch_size,
                         workers=args.workers, index_type="flat", progress=False)  # fmt: skip
    assert report.encoded == args.n, report.summary()
    build = report.images_per_s
    raw_after = raw_encode_rate(encoder, paths, args.n, args.batch_size)
    raw = (raw_before + raw_after) / 2  # measured before and after the build: drift on a shared machine
    print(f"{'raw encode_pixels':28} {raw:10.1f} img/s   (before {raw_before:.1f}, after {raw_after:.1f})")
    print(f"{'decode+preprocess (1 proc)':28} {dec:10.1f} img/s")
    print(f"{'build_index':28} {build:10.1f} img/s   ({report.seconds:.1f} s for {report.encoded} images)")
    print(f"{'ratio build / raw':28} {build / raw:10.2f}")
    if encoder.device.type == "cpu":  # decoding and encoding share the same cores
        cpus = os.cpu_count() or 1
        ceiling = 1 / (1 + raw / (dec * cpus))
        print(f"{'CPU-only ceiling':28} {ceiling:10.2f}   = 1 / (1 + raw / (decode x {cpus} CPUs)): decoding "
              "takes CPU time away from the encoder; on a GPU the ceiling is 1")  # fmt: skip
    if args.engine == "ray":
        from index.ray_engine import build_index_ray

        spec = {"model": str(model_dir), "mode": None, "device": args.device, "dtype": args.dtype}
        ray_dir = Path(tempfile.mkdtemp(prefix="index_ray_", dir=work))
        ray_report = build_index_ray(
            [paths[0].parent], ray_dir, encoder, spec, ray_address=args.ray_address,
            shard_size=args.shard_size, batch_size=args.batch_size, index_type="flat", progress=False,
        )  # fmt: skip
        assert ray_report.encoded == args.n, ray_report.summary()
        rate = ray_report.images_per_s
        print(f"{'build_index --engine ray':28} {rate:10.1f} img/s   ({ray_report.seconds:.1f} s, "
              f"Ray start-up included, shards of {args.shard_size})")  # fmt: skip
        print(f"{'ratio ray / local':28} {rate / build:10.2f}")


if __name__ == "__main__":
    main()
