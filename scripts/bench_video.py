#!/usr/bin/env python
"""Video indexing throughput: frames decoded per second and per-video indexing time, next to images/s.

    python scripts/bench_video.py [--lengths 2,8,30] [--size 1920x1080] [--fps 30] [--segments 1]
        [--model random|demo|PATH] [--images 64] [--batch-size 32] [--device cpu] [--workdir DIR]

Generates 1080p H.264 clips (PyAV, ``yuv420p``, GOP 2 s; moving gradients and shapes, light noise) of
each length in ``--lengths`` seconds and, in the same run, ``--images`` JPEGs of the same size. Printed
per clip: sequential decode frames/s (every frame, ``chat.video.VideoReader.frames``), sampled decode
frames/s (the 8 uniformly sampled frames of ``frame_indices``, with seeking, as the index reads a video
without segments), and ``build_index`` seconds for that one video (with ``--segments S``: 8 frames per
S-second segment too), as frames embedded/s and seconds per second of video. Then the image pipeline's
``build_index`` images/s on the JPEGs, with the same encoder and batch size.

``--model random`` (default) is an OpenCLIP ViT-B-32 with random weights (same compute as real ones, see
``bench_build.py``); ``demo`` is the small bundled demo encoder; anything else is a model folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_clip(path: Path, seconds: float, width: int, height: int, fps: int) -> Path:
    """A ``seconds``-long H.264 mp4: a drifting two-colour gradient with a moving disc and box."""
    import av

    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(seconds * 1000) + width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1, disc, box = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(4))
    noise = rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    n = int(round(seconds * fps))
    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.options = {"preset": "ultrafast"}
        for i in range(n):
            t = i / fps
            g = ((xx / width) * (0.5 + 0.5 * np.sin(t)) + yy / height * 0.5)[..., None] / 1.5
            img = c0 * (1 - g) + c1 * g
            cx, cy, r = (0.5 + 0.4 * np.sin(0.7 * t)) * width, (0.5 + 0.3 * np.cos(t)) * height, height / 6
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = disc
            bx, by = int((0.1 + 0.8 * ((t / 5) % 1)) * width), int(0.2 * height)
            img[by : by + height // 5, max(0, bx - width // 10) : bx] = box
            img += np.roll(noise, i * 7, axis=1)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
    return path


def decode_rates(path: Path) -> tuple[int, float, float]:
    """(frame count, sequential frames/s over all frames, sampled frames/s over the 8 sampled frames)."""
    from chat.video import VideoReader, frame_indices
    from retrieval.video import VIDEO_EMBED_FRAMES

    with VideoReader(str(path), max_pixels=None) as reader:
        n = len(reader)
        start = time.perf_counter()
        count = sum(1 for _ in reader.frames(range(n)))
        sequential = count / (time.perf_counter() - start)
    with VideoReader(str(path), max_pixels=None) as reader:  # fresh reader: no decoder state kept
        wanted = frame_indices(None, reader.info.fps, reader.info.max_frame, num_segments=VIDEO_EMBED_FRAMES)
        start = time.perf_counter()
        got = reader.get_batch(wanted)
        sampled = len(got) / (time.perf_counter() - start)
    return n, sequential, sampled


def load_model(name: str, work: Path, device: str | None, dtype: str | None):  # noqa: ANN201
    from retrieval import load_encoder

    if name == "random":
        from bench_build import make_model

        return "ViT-B-32 (random weights)", load_encoder(make_model(work / "vit-b-32-random"), device=device,
                                                         dtype=dtype)  # fmt: skip
    return name, load_encoder(name, device=device, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2,8,30", help="clip lengths in seconds, comma-separated")
    p.add_argument("--size", default="1920x1080", help="clip and JPEG size WxH")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--segments", type=float, default=1.0, help="--video-segments (0: whole-video rows only)")
    p.add_argument(
        "--model", default="random", help='"random" (ViT-B-32, random weights), "demo", or a folder'
    )
    p.add_argument("--images", type=int, default=64, help="JPEGs for the image pipeline's images/s")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--workers", type=int, default=None, help="image decoding processes (build_index's default)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--workdir", default=None, help="keeps the model, clips and JPEGs between runs")
    args = p.parse_args(argv)
    import torch
    from bench_build import make_photos

    from index.builder import build_index

    lengths = [float(x) for x in args.lengths.split(",") if x.strip()]
    width, height = (int(v) for v in args.size.lower().split("x"))
    segments = args.segments if args.segments > 0 else None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_video_"))
    name, encoder = load_model(args.model, work, args.device, args.dtype)
    print(f"model {name} on {encoder.device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs; clips {width}x{height} H.264 {args.fps} fps,"
          f" segments {segments or 'off'} s, "
          f"batch {args.batch_size}")  # fmt: skip

    t = time.perf_counter()
    clips = [make_clip(work / f"clips_{width}x{height}_{args.fps}" / f"clip_{s:g}s.mp4", s, width, height,
                       args.fps) for s in lengths]  # fmt: skip
    print(f"(clips ready in {time.perf_counter() - t:.1f} s)")
    results = []
    header = f"{'clip':>8} {'frames':>7} {'decode seq f/s':>15} {'decode 8-sampled f/s':>21} "
    print(header + f"{'index s/video':>14} {'embedded f/s':>13} {'s per video s':>14} {'rows':>5}")
    for seconds, clip in zip(lengths, clips, strict=True):
        n, seq, sampled = decode_rates(clip)
        folder = Path(tempfile.mkdtemp(prefix="one_", dir=work))
        try:
            os.link(clip, folder / clip.name)
        except OSError:
            (folder / clip.name).write_bytes(clip.read_bytes())
        report = build_index([folder], folder / "index", encoder, batch_size=args.batch_size, workers=0,
                             index_type="flat", progress=False, video_segments=segments,
                             max_pixels=None)  # fmt: skip
        assert report.videos == 1, report.summary()
        embedded = 8 * (1 + report.segments)  # frames sampled: 8 for the video, 8 per segment (at most)
        row = {"seconds": seconds, "frames": n, "decode_seq_fps": seq, "decode_sampled_fps": sampled,
               "index_s": report.seconds, "embedded_fps": embedded / report.seconds,
               "rows": 1 + report.segments}  # fmt: skip
        results.append(row)
        print(f"{seconds:>7g}s {n:>7} {seq:>15.1f} {sampled:>21.1f} {report.seconds:>14.2f} "
              f"{row['embedded_fps']:>13.1f} {report.seconds / seconds:>14.3f} {row['rows']:>5}")  # fmt: skip

    photos = make_photos(work / f"photos_{width}x{height}", args.images, width, height)
    index_dir = Path(tempfile.mkdtemp(prefix="images_", dir=work))
    report = build_index([photos[0].parent], index_dir, encoder, batch_size=args.batch_size,
                         workers=args.workers, index_type="flat", progress=False)  # fmt: skip
    assert report.encoded == args.images, report.summary()
    print(f"image pipeline (build_index, {args.images} JPEGs {width}x{height}): "
          f"{report.images_per_s:.1f} images/s ({report.seconds:.2f} s)")  # fmt: skip
    print(json.dumps({"clips": results, "images_per_s": report.images_per_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
