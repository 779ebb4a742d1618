"""Encoder throughput: images/s and texts/s at a few batch sizes, and the PIL pipeline's overhead.

    python scripts/bench_encoders.py --model tests/fixtures/internvl_cg_tiny [--mode internvl-g]
        [--device cpu] [--batch-sizes 1,8,32] [--image-size 640x480] [--repeats 2] [--threads 1]

For every batch size, in one run: ``encode_images`` on PIL images (decode-free, but preprocessing included),
``encode_pixels`` on ready tensors (model only), their ratio (the preprocessing overhead), and
``encode_texts`` (tokenising included). Best of ``--repeats`` timings, after one warm-up batch.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from retrieval import load_encoder
from retrieval.devices import DTYPE_HELP, dtype_arg

WORDS = "a photo of the small red cat dog sitting on a wooden table near the window at night".split()


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    w, h = size
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 20)))) for _ in range(n)]


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def run_pixel_batches(encode: Callable[[torch.Tensor], np.ndarray], pixels: torch.Tensor, bs: int) -> None:
    for i in range(0, len(pixels), bs):
        encode(pixels[i : i + bs])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (InternVL-C/G or OpenCLIP) or 'demo'")
    p.add_argument("--mode", default=None, help="internvl-c (default) / internvl-g / openclip")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        type=dtype_arg,
        metavar="DTYPE",
        help=DTYPE_HELP,
    )
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--image-size", default="640x480", help="WxH of the synthetic PIL images")
    p.add_argument("--batches", type=int, default=1, help="batches per timing")
    p.add_argument("--repeats", type=int, default=2, help="timings per measurement (best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy shared machine)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        p.error("--batch-sizes must be positive integers")
    w, h = (int(v) for v in args.image_size.lower().split("x"))

    encoder = load_encoder(args.model, mode=args.mode, device=args.device, dtype=args.dtype)
    cuda = encoder.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n_max = max(batch_sizes) * args.batches
    images = synthetic_images(n_max, (w, h))
    texts = synthetic_texts(n_max)
    pixels = torch.stack([encoder.preprocess(im) for im in images])
    encoder.encode_images(images[:2])  # warm-up (allocations, kernel selection)
    encoder.encode_texts(texts[:2])

    print(
        f"model {encoder.name}  device {encoder.device}  dtype {getattr(encoder, 'dtype', '?')}  "
        f"threads {torch.get_num_threads()}  images {w}x{h} -> {tuple(pixels.shape[1:])}"
    )
    header = f"{'batch':>6} {'PIL img/s':>11} {'tensor img/s':>13} {'PIL/tensor':>11} {'texts/s':>10}"
    print(header)
    print("-" * len(header))
    for bs in batch_sizes:
        n = bs * args.batches
        pil_batch = functools.partial(encoder.encode_images, images[:n], batch_size=bs)
        text_batch = functools.partial(encoder.encode_texts, texts[:n], batch_size=bs)
        pixel_batches = functools.partial(run_pixel_batches, encoder.encode_pixels, pixels[:n], bs)
        t_pil = best_time(pil_batch, args.repeats, sync)
        t_px = best_time(pixel_batches, args.repeats, sync)
        t_txt = best_time(text_batch, args.repeats, sync)
        print(f"{bs:>6} {n / t_pil:>11.1f} {n / t_px:>13.1f} {t_pil / t_px:>10.2f}x {n / t_txt:>10.1f}")
    print(
        "PIL/tensor = time of encode_images(PIL) / time of encode_pixels(ready tensors) = pipeline overhead"
    )


if __name__ == "__main__":
    main()
