"""Quick start: generate a demo image and video folder, index it with the bundled demo model, serve the API.

    python scripts/demo.py                 # ./demo_data/images, ./demo_data/index, http://127.0.0.1:8000
    python scripts/demo.py --no-serve      # stop after building the index

Runs ``generate_shapes.py`` (coloured shapes on plain/textured backgrounds), renders a few short H.264
clips of moving shapes (one shape and colour per second, see :data:`VIDEO_SCENES`) into the same folder,
then ``build_index.py --model demo --video-segments 1`` (so ``/search`` also returns video moments, rows
of ``kind: "segment"`` with ``t_start`` / ``t_end``), then ``python -m api --index ... --model demo
--chat-model demo`` (grounded ``/chat`` with the bundled demo chat model; ``--no-chat`` leaves it off);
prints curl examples and the web page's address (``http://127.0.0.1:8000/``).
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import generate_shapes  # noqa: E402
from shapes_vocab import COLOURS  # noqa: E402

#: the demo clips: one (shape, colour) scene per second of each clip (disjoint, so each is one segment)
VIDEO_SCENES = (
    (("circle", "red"), ("square", "blue"), ("triangle", "green"), ("star", "yellow")),
    (("heart", "purple"), ("cross", "black"), ("hexagon", "orange"), ("circle", "pink")),
    (("circle", "blue"), ("square", "red"), ("star", "green"), ("triangle", "purple")),
    (("heart", "yellow"), ("cross", "orange"), ("hexagon", "black"), ("square", "pink")),
)
VIDEO_FPS = 10
VIDEO_SIZE = (160, 120)  # width, height (even, for yuv420p)
VIDEO_EXTENSION = ".mp4"


def video_name(i: int) -> str:
    return f"clip_{i:02d}{VIDEO_EXTENSION}"


def render_video(path: Path, scenes, seed: int, fps: int = VIDEO_FPS, size=VIDEO_SIZE) -> Path:
    """One clip, one second per scene: the shape glides across a plain background, turning slowly."""
    from fractions import Fraction

    import av  # PyAV: H.264 in mp4
    import numpy as np

    w, h = size
    rng = random.Random(seed)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = fps
        for shape, colour in scenes:
            fill = generate_shapes.jitter_colour(COLOURS[colour], rng)
            canvas = generate_shapes.background(h, w, fill, "plain", rng)
            r = rng.uniform(0.3, 0.38) * min(w, h)
            y0, y1 = rng.uniform(r, h - r), rng.uniform(r, h - r)
            x0, x1 = (r, w - r) if rng.random() < 0.5 else (w - r, r)
            angle = rng.uniform(-0.3, 0.3)
            for i in range(fps):
                t = i / max(1, fps - 1)
                cx, cy = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
                mask = generate_shapes.shape_mask(shape, h, w, cx, cy, r, angle + 0.4 * t * math.pi / 4)
                img = canvas * (1 - mask[..., None]) + fill * mask[..., None]
                frame = av.VideoFrame.from_ndarray(
                    np.clip(img + 0.5, 0, 255).astype(np.uint8), format="rgb24"
                )
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def render_videos(folder: Path, seed: int) -> list[Path]:
    """The :data:`VIDEO_SCENES` clips in ``folder`` (kept when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scenes in enumerate(VIDEO_SCENES):
        path = folder / video_name(i)
        if not path.is_file() or path.stat().st_size == 0:
            tmp = path.with_name(f".{path.stem}.tmp{VIDEO_EXTENSION}")
            render_video(tmp, scenes, seed * 1_000_003 + 7919 * (i + 1))
            tmp.replace(path)
        paths.append(path)
    return paths


def curl_examples(host: str, port: int, image: Path) -> str:
    """The README's curl calls: text search in English and Chinese, zero-shot classification."""
    url, json_header = f"http://{host}:{port}", "-H 'Content-Type: application/json'"
    labels = '["red circle", "blue square", "green triangle", "yellow star", "purple heart", "black cross"]'
    return "\n".join(
        [
            "# text -> image search (English, Chinese); results include video moments (kind, t_start, t_end)",
            f'curl -s {url}/search {json_header} -d \'{{"text": "a red circle", "k": 5}}\'',
            f'curl -s {url}/search {json_header} -d \'{{"text": "红色的圆形", "k": 5}}\'',
            "# zero-shot classification of an uploaded image (base64) or an indexed one (image_id)",
            f"curl -s {url}/classify {json_header} "
            f'-d \'{{"image": "\'"$(base64 -w0 {shlex.quote(str(image))})"\'", "labels": {labels}}}\'',
            f'curl -s {url}/classify {json_header} -d \'{{"image_id": 1, "labels": {labels}}}\'',
            "# grounded chat: retrieves the best-matching images, answers over them, cites its sources",
            f'curl -s {url}/chat {json_header} -d \'{{"question": "Which picture has a red circle?"}}\'',
        ]
    )


def page_url(host: str, port: int) -> str:
    """The web page's address (search, browse, classify and ask in a browser)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}/"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_data"), help="demo folder (images/ and index/)")
    p.add_argument("--n", type=int, default=300, help="number of demo images")
    p.add_argument("--seed", type=int, default=2024, help="generator seed (the demo model trained on seed 0)")
    p.add_argument("--model", default="demo", help='encoder folder, or "demo" (the bundled model)')
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--chat-model", default="demo", help='chat model folder, or "demo" (the bundled model)')
    p.add_argument("--no-chat", action="store_true", help="serve without a chat model (/chat answers 503)")
    p.add_argument("--no-serve", action="store_true", help="generate and index only")
    p.add_argument("--no-videos", action="store_true", help="no demo videos")
    p.add_argument("--video-segments", type=float, default=1.0, metavar="S", help="segment length (seconds)")
    args = p.parse_args(argv)

    images = args.out / "images"
    pictures = lambda: sorted(f for f in images.iterdir() if not f.name.endswith(VIDEO_EXTENSION))  # noqa: E731
    if images.is_dir() and len(pictures()) == args.n:
        print(f"[1/3] reusing {args.n} images in {images}")
    else:
        print(f"[1/3] generating {args.n} images into {images}")
        generate_shapes.main(["--out", str(args.out), "--n", str(args.n), "--seed", str(args.seed)])
    videos = [] if args.no_videos else render_videos(images, args.seed)
    if videos:
        print(f"      {len(videos)} videos of {len(VIDEO_SCENES[0])} s ({VIDEO_FPS} fps) in {images}")
    index = args.out / "index"
    print(f"[2/3] indexing with model {args.model!r} into {index}")
    build = [sys.executable, str(SCRIPTS / "build_index.py"), str(images), "--index", str(index)]
    build += ["--no-videos"] if args.no_videos else ["--video-segments", f"{args.video_segments:g}"]
    subprocess.run([*build, "--model", args.model, "--device", "cpu", "--no-progress"], check=True)
    first = pictures()[0]
    print("\nTry:\n" + curl_examples(args.host, args.port, first) + "\n")
    url = page_url(args.host, args.port)
    chat = [] if args.no_chat else ["--chat-model", args.chat_model]
    if args.no_serve:
        print("[3/3] skipped (--no-serve); start the server with:")
        command = ["python", "-m", "api", "--index", str(index), "--model", args.model, *chat]
        print("  " + shlex.join([*command, "--host", args.host, "--port", str(args.port)]))
        print(f"then open the web page: {url}")
        return 0
    print(f"[3/3] serving on http://{args.host}:{args.port} (Ctrl-C stops)")
    print(f"      open the web page: {url}  (search in English, 中文, 日本語, español or français)")
    serve = [sys.executable, "-m", "api", "--index", str(index), "--model", args.model, *chat]
    try:
        return subprocess.run([*serve, "--host", args.host, "--port", str(args.port)], check=False).returncode
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
