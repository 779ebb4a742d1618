"""Quick start: generate a demo image folder, index it with the bundled demo model, serve the API.

    python scripts/demo.py                 # ./demo_data/images, ./demo_data/index, http://127.0.0.1:8000
    python scripts/demo.py --no-serve      # stop after building the index

Runs ``generate_shapes.py`` (coloured shapes on plain/textured backgrounds), then
``build_index.py --model demo``, then ``python -m api --index ... --model demo``; prints curl examples.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import generate_shapes  # noqa: E402


def curl_examples(host: str, port: int, image: Path) -> str:
    """The README's curl calls: text search in English and Chinese, zero-shot classification."""
    url, json_header = f"http://{host}:{port}", "-H 'Content-Type: application/json'"
    labels = '["red circle", "blue square", "green triangle", "yellow star", "purple heart", "black cross"]'
    return "\n".join(
        [
            "# text -> image search (English, Chinese)",
            f'curl -s {url}/search {json_header} -d \'{{"text": "a red circle", "k": 5}}\'',
            f'curl -s {url}/search {json_header} -d \'{{"text": "红色的圆形", "k": 5}}\'',
            "# zero-shot classification of an uploaded image (base64) or an indexed one (image_id)",
            f"curl -s {url}/classify {json_header} "
            f'-d \'{{"image": "\'"$(base64 -w0 {shlex.quote(str(image))})"\'", "labels": {labels}}}\'',
            f'curl -s {url}/classify {json_header} -d \'{{"image_id": 1, "labels": {labels}}}\'',
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_data"), help="demo folder (images/ and index/)")
    p.add_argument("--n", type=int, default=300, help="number of demo images")
    p.add_argument("--seed", type=int, default=2024, help="generator seed (the demo model trained on seed 0)")
    p.add_argument("--model", default="demo", help='encoder folder, or "demo" (the bundled model)')
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="generate and index only")
    args = p.parse_args(argv)

    images = args.out / "images"
    if images.is_dir() and len(list(images.iterdir())) == args.n:
        print(f"[1/3] reusing {args.n} images in {images}")
    else:
        print(f"[1/3] generating {args.n} images into {images}")
        generate_shapes.main(["--out", str(args.out), "--n", str(args.n), "--seed", str(args.seed)])
    index = args.out / "index"
    print(f"[2/3] indexing with model {args.model!r} into {index}")
    build = [sys.executable, str(SCRIPTS / "build_index.py"), str(images), "--index", str(index)]
    subprocess.run([*build, "--model", args.model, "--device", "cpu", "--no-progress"], check=True)
    first = min(images.iterdir())
    print("\nTry:\n" + curl_examples(args.host, args.port, first) + "\n")
    if args.no_serve:
        print("[3/3] skipped (--no-serve); start the server with:")
        print(f"  python -m api --index {index} --model {args.model} --host {args.host} --port {args.port}")
        return 0
    print(f"[3/3] serving on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve = [sys.executable, "-m", "api", "--index", str(index), "--model", args.model]
    try:
        return subprocess.run([*serve, "--host", args.host, "--port", str(args.port)], check=False).returncode
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
