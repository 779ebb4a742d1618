#!/usr/bin/env python
"""Index image and video folders into a FAISS + SQLite index, incrementally and resumably.

    python scripts/build_index.py FOLDER [FOLDER ...] --index DIR --model PATH [--mode internvl-c|internvl-g]
        [--batch-size N] [--workers N] [--index-type auto|flat|ivf-flat|ivf-pq|hnsw] [--device cpu|cuda]
        [--prune] [--max-pixels N] [--video-segments SECONDS] [--max-video-seconds S] [--no-videos]
        [--engine local|ray] [--ray-address auto|HOST:PORT] [--shard-size N] [--encoders N] [--decoders N]
        [--ondisk] [--from-list PATHS.parquet] [--caption [--caption-prompt P] [--caption-batch-size N]]

``--engine ray`` (extra ``.[distributed]``) plans on this machine, decodes and encodes on a Ray cluster
(``--ray-address``; default: a local Ray instance) shard by shard and merges into the same index; a
re-run after a crash does only the missing shards (``index/ray_engine.py``, ``docs/scale-out.md``).
``--from-list`` takes a parquet file with a ``path`` column (optional ``size``, ``mtime`` in ns) instead
of walking; FOLDERs, when given, are the roots the listed paths are stored under.

Videos (mp4, mov, mkv, webm, avi, m4v) get one row each (mean embedding of 8 uniformly sampled frames,
``kind: "video"``) and, with ``--video-segments S``, one row per S-second segment (``kind: "segment"``,
``t_start`` / ``t_end`` in seconds).

``--caption`` also stores a generated caption per image (per video: of its middle frame) for keyword
search and the ``caption`` of search results; a re-run captions only rows that have none. It needs an
InternVL checkpoint (OpenCLIP has no text decoder). The demo model's QLLaMA query branch is untrained
(``retrieval/demo_model/README.md``), so the demo captions nothing by default and its captions with
``--caption`` are not meaningful.

Progress goes to stderr; the last line on stdout is a JSON summary
``{"scanned", "added", "updated", "removed", "skipped", "seconds", "images_per_s", ...}``. Skipped files
and their reasons are listed in ``DIR/skipped.tsv`` and ``DIR/build_report.json``. Exit status: 0 when
the run completed (skips included), 2 bad arguments, 3 model or index problem, 4 I/O error,
5 the Ray pipeline failed (finished shards are kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from index import IndexFormatError, IndexLockedError, IndexMismatchError
from index.faiss_index import INDEX_TYPES
from retrieval.devices import DTYPE_HELP, dtype_arg
from retrieval.images import DEFAULT_MAX_PIXELS

#: the builder's defaults, repeated here so that ``--help`` needs no heavy import (tested equal)
DEFAULT_MAX_VIDEO_SECONDS = 3 * 3600.0
DEFAULT_MAX_VIDEO_BYTES = 8 << 30

logger = logging.getLogger("build_index")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="image folders to index (recursive)")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (created if missing)")
    p.add_argument("--model", required=True, metavar="PATH", help='model folder, or "demo"')
    p.add_argument("--mode", choices=["internvl-c", "internvl-g", "openclip"], default=None)
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="decoding processes (default: CPUs, max 8)"
    )
    p.add_argument(
        "--index-type",
        choices=INDEX_TYPES,
        default=None,
        help="FAISS index type (default: keep an existing index's type, auto for a new one)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        type=dtype_arg,
        metavar="DTYPE",
        help=DTYPE_HELP,
    )
    p.add_argument("--prune", action="store_true", help="remove rows of files that no longer exist")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"skip images with more pixels (decompression-bomb guard, default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--video-segments",
        type=float,
        default=None,
        metavar="SECONDS",
        help="also index each video in segments of this many seconds (rows with t_start / t_end)",
    )
    p.add_argument(
        "--max-video-seconds",
        type=float,
        default=DEFAULT_MAX_VIDEO_SECONDS,
        metavar="S",
        help=f"skip longer videos (default {DEFAULT_MAX_VIDEO_SECONDS:g})",
    )
    p.add_argument(
        "--max-video-bytes",
        type=int,
        default=DEFAULT_MAX_VIDEO_BYTES,
        metavar="N",
        help=f"skip larger video files (default {DEFAULT_MAX_VIDEO_BYTES})",
    )
    p.add_argument("--no-videos", action="store_true", help="index images only")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where to decode and encode")
    p.add_argument(
        "--ray-address", default=None, metavar="ADDR", help="Ray cluster: auto or HOST:PORT (default: local)"
    )
    p.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="images per shard (ray)")
    p.add_argument(
        "--encoders", type=int, default=None, metavar="N", help="encoder actors (ray; default: GPUs or 1)"
    )
    p.add_argument(
        "--decoders", type=int, default=None, metavar="N", help="decode tasks (ray; default: free CPUs)"
    )
    p.add_argument(
        "--ondisk",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ray: final IVF on disk, blocks added in parallel (default: above 20M vectors)",
    )
    p.add_argument(
        "--from-list", default=None, metavar="PARQUET", help="parquet of paths to index instead of walking"
    )
    p.add_argument(
        "--caption", action="store_true", help="store a caption per image / video (rows without one only)"
    )
    p.add_argument("--caption-prompt", default="English caption:", metavar="P", help="caption prompt")
    p.add_argument("--caption-batch-size", type=int, default=8, metavar="N", help="images per caption batch")
    p.add_argument("--commit-every", type=int, default=1024, metavar="N", help="images per committed chunk")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)  # seconds per batch (tests)
    args = p.parse_args(argv)
    for name in ("batch_size", "commit_every", "caption_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.video_segments is not None and not args.video_segments > 0:
        p.error("--video-segments must be > 0")
    if not args.max_video_seconds > 0 or args.max_video_bytes < 1:
        p.error("--max-video-seconds and --max-video-bytes must be positive")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    if not args.folders and args.from_list is None:
        p.error("give FOLDER arguments or --from-list")
    if args.shard_size < 1 or any(v is not None and v < 1 for v in (args.encoders, args.decoders)):
        p.error("--shard-size, --encoders and --decoders must be >= 1")
    ray_only = ("ray_address", "encoders", "decoders", "from_list", "ondisk")
    if args.engine == "local" and any(getattr(args, n) is not None for n in ray_only):
        p.error("--ray-address, --encoders, --decoders, --from-list and --ondisk need --engine ray")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from index.builder import build_index  # heavy imports after argument checks
    from retrieval import load_encoder

    try:
        encoder = load_encoder(args.model, mode=args.mode, device=args.device, dtype=args.dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 3
    if args.caption and not encoder.can_caption:
        print(f"error: --caption: model {args.model!r} cannot caption (no text decoder)", file=sys.stderr)
        return 3
    common = dict(
        batch_size=args.batch_size,
        index_type=args.index_type,
        prune=args.prune,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
        throttle=args.throttle,
        videos=not args.no_videos,
        video_segments=args.video_segments,
        max_video_seconds=args.max_video_seconds,
        max_video_bytes=args.max_video_bytes,
        caption=args.caption,
        caption_prompt=args.caption_prompt,
        caption_batch_size=args.caption_batch_size,
    )
    engine_error: type[Exception] = RuntimeError
    try:
        if args.engine == "ray":
            from index.ray_engine import RayEngineError, build_index_ray

            engine_error = RayEngineError
            spec = {"model": args.model, "mode": args.mode, "device": args.device, "dtype": args.dtype}
            report = build_index_ray(
                args.folders,
                args.index,
                encoder,
                spec,
                ray_address=args.ray_address,
                shard_size=args.shard_size,
                encoders=args.encoders,
                decoders=args.decoders,
                from_list=args.from_list,
                ondisk=args.ondisk,
                **common,
            )
        else:
            report = build_index(
                args.folders,
                args.index,
                encoder,
                workers=args.workers,
                commit_every=args.commit_every,
                **common,
            )
    except KeyboardInterrupt:
        print("interrupted; committed work is kept, re-run to finish", file=sys.stderr)
        return 130
    except (IndexMismatchError, IndexFormatError, IndexLockedError, NotImplementedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except engine_error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 5
    if report.skipped:
        print(f"{report.skipped} files skipped, listed in {args.index}/skipped.tsv", file=sys.stderr)
    print(json.dumps(report.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
