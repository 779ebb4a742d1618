"""Procedural multilingual shapes dataset: coloured shapes on plain or textured backgrounds, with captions.

    python scripts/generate_shapes.py --out data/shapes_train --n 20000 --seed 0

Writes ``DIR/images/*.png|jpg``, ``DIR/captions.csv`` (file, caption, language, shape, colour, size,
position, background, width, height) and ``DIR/labels.json`` (class labels and zero-shot prompts per
language, read by ``eval_zero_shot.py``). Shapes are rasterised from signed-distance / even-odd masks in
numpy with supersampling (not with PIL drawing calls), so a PIL-drawn test set is out of distribution.
Deterministic per ``--seed``: one ``random.Random(seed * 1_000_003 + i)`` per image.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import logging
import math
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_vocab import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    LANGUAGES,
    POSITIONS,
    SHAPES,
    SIZES,
    caption,
    labels_manifest,
)

logger = logging.getLogger("generate_shapes")
FIELDS = [
    "file",
    "caption",
    "language",
    "shape",
    "colour",
    "size",
    "position",
    "background",
    "width",
    "height",
]
SUPERSAMPLE = 3


# --- geometry: unit outlines centred at 0, radius ~1 -------------------------------------------------------
def _regular(n: int, phase: float) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, -math.pi / 2), 0.45 * _regular(5, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], 1).reshape(-1, 2)


def _cross(arm: float = 0.36) -> np.ndarray:
    a = arm
    return np.array(
        [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ],
        dtype=float,
    )


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)
    return pts / np.abs(pts).max()


OUTLINES = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float) * 0.85,
    "triangle": _regular(3, -math.pi / 2) * np.array([1.0, 1.0]) + np.array([0, 0.2]),
    "star": _star(),
    "hexagon": _regular(6, 0.0),
    "cross": _cross(),
    "heart": _heart(),
}


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over the sample grid."""
    inside = np.zeros(x.shape, dtype=bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1, strict=True):
        crosses = (ay > y) != (by > y)
        xi = ax + (y - ay) * (bx - ax) / (by - ay + 1e-12)
        inside ^= crosses & (x < xi)
    return inside


def shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (h, w): supersampled point tests, box-filtered."""
    s = SUPERSAMPLE
    # only pixels within the outline's bounding circle are sampled (same result, less work)
    reach = r * (1.0 if shape == "circle" else float(np.linalg.norm(OUTLINES[shape], axis=1).max())) + 1
    x0, x1 = max(0, int(cx - reach)), min(w, int(math.ceil(cx + reach)))
    y0, y1 = max(0, int(cy - reach)), min(h, int(math.ceil(cy + reach)))
    ys = y0 + (np.arange((y1 - y0) * s) + 0.5) / s
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s
    gx, gy = np.meshgrid(xs - cx, ys - cy)
    ca, sa = math.cos(angle), math.sin(angle)
    ux, uy = (ca * gx + sa * gy) / r, (-sa * gx + ca * gy) / r  # rotate into the shape's unit frame
    inside = (ux**2 + uy**2 <= 1.0) if shape == "circle" else _inside_polygon(ux, uy, OUTLINES[shape])
    mask = np.zeros((h, w))
    mask[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return mask


# --- colours and backgrounds ----------------------------------------------------------------------
def jitter_colour(base: tuple[int, int, int], rng: random.Random) -> np.ndarray:
    """Base RGB with small hue and larger saturation/value jitter (black: value only)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in base))
    h = (h + rng.uniform(-0.025, 0.025)) % 1.0
    s = min(1.0, max(0.0, s * rng.uniform(0.8, 1.1)))
    v = min(1.0, max(0.0, v * rng.uniform(0.8, 1.1))) if v > 0.2 else rng.uniform(0.0, 0.2)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255


def background_colour(fill: np.ndarray, rng: random.Random) -> np.ndarray:
    """A mostly unsaturated colour that contrasts with ``fill``."""
    for _ in range(50):
        sat = rng.uniform(0, 0.25) if rng.random() < 0.8 else rng.uniform(0.25, 0.5)
        rgb = np.array(colorsys.hsv_to_rgb(rng.random(), sat, rng.uniform(0.35, 1.0))) * 255
        if np.abs(rgb - fill).sum() > 200:
            return rgb
    return np.full(3, 255.0) if fill.mean() < 128 else np.zeros(3)


def background(h: int, w: int, fill: np.ndarray, kind: str, rng: random.Random) -> np.ndarray:
    """(h, w, 3) float canvas: plain, or one of stripes / checker / gradient / noise / dots."""
    base = background_colour(fill, rng)
    canvas = np.broadcast_to(base, (h, w, 3)).astype(np.float64).copy()
    if kind == "plain":
        return canvas
    other = base * rng.uniform(0.6, 0.85) if base.mean() > 100 else np.minimum(base + 60, 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pattern = rng.choice(["stripes", "checker", "gradient", "noise", "dots"])
    period = rng.uniform(4, 14)
    if pattern == "stripes":
        t = rng.uniform(0, math.pi)
        m = (np.sin((xx * math.cos(t) + yy * math.sin(t)) * 2 * math.pi / period) > 0).astype(float)
    elif pattern == "checker":
        m = ((xx // period + yy // period) % 2).astype(float)
    elif pattern == "gradient":
        t = rng.uniform(0, 2 * math.pi)
        g = xx * math.cos(t) + yy * math.sin(t)
        m = (g - g.min()) / max(np.ptp(g), 1e-6)
    elif pattern == "noise":
        nrng = np.random.default_rng(rng.getrandbits(32))
        coarse = nrng.random((h // 4 + 2, w // 4 + 2))
        m = np.kron(coarse, np.ones((4, 4)))[:h, :w]
    else:
        m = (
            (np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2
            < (period / 4) ** 2
        ).astype(float)
    return canvas * (1 - m[..., None]) + other * m[..., None]


# --- one sample -----------------------------------------------------------------------------------
def sample_spec(rng: random.Random) -> dict:
    """Random shape, colour, size, position, background and canvas size (aspect 0.6-1.67)."""
    w = rng.randint(48, 176)
    h = int(min(176, max(40, w * rng.uniform(0.6, 1.67))))
    rel = rng.uniform(0.28, 0.8)  # diameter / shorter side
    r = rel * min(w, h) / 2
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    return {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "size": SIZES[0] if rel < 0.42 else SIZES[1] if rel < 0.6 else SIZES[2],
        "position": POSITIONS[3 * min(2, int(3 * cy / h)) + min(2, int(3 * cx / w))],
        "background": rng.choice(BACKGROUNDS),
        "width": w,
        "height": h,
        "cx": cx,
        "cy": cy,
        "r": r,
        "angle": rng.uniform(-0.3, 0.3),
    }


def render(spec: dict, rng: random.Random) -> Image.Image:
    """Composite the shape over its background, with optional shading and outline."""
    h, w = spec["height"], spec["width"]
    fill = jitter_colour(COLOURS[spec["colour"]], rng)
    canvas = background(h, w, fill, spec["background"], rng)
    mask = shape_mask(spec["shape"], h, w, spec["cx"], spec["cy"], spec["r"], spec["angle"])
    colour = np.broadcast_to(fill, (h, w, 3)).astype(np.float64)
    if rng.random() < 0.3:  # soft shading across the shape
        t = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        g = ((xx - spec["cx"]) * math.cos(t) + (yy - spec["cy"]) * math.sin(t)) / spec["r"]
        colour = colour * (1 + 0.12 * np.clip(g, -1, 1))[..., None]
    out = canvas * (1 - mask[..., None]) + colour * mask[..., None]
    if rng.random() < 0.25:  # darker outline ring
        inner = shape_mask(spec["shape"], h, w, spec["cx"], spec["cy"], spec["r"] * 0.88, spec["angle"])
        ring = np.clip(mask - inner, 0, 1)[..., None]
        out = out * (1 - ring) + fill * 0.55 * ring
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def make_one(out: Path, i: int, seed: int, languages: tuple[str, ...]) -> dict:
    """Render image ``i`` into ``out/images`` and return its row (a pure function of ``i`` and ``seed``)."""
    rng = random.Random(seed * 1_000_003 + i)
    spec = sample_spec(rng)
    image = render(spec, rng)
    lang = languages[i % len(languages)]
    ext = "jpg" if rng.random() < 0.2 else "png"
    name = f"{i:06d}.{ext}"
    if ext == "jpg":
        image.save(out / "images" / name, quality=rng.randint(75, 95))
    else:
        image.save(out / "images" / name)
    row = {k: spec[k] for k in FIELDS if k in spec}
    return {**row, "file": f"images/{name}", "caption": caption(spec, lang, rng), "language": lang}


def generate(
    out: Path, n: int, seed: int, languages: tuple[str, ...] = LANGUAGES, workers: int = 1
) -> list[dict]:
    """Render ``n`` images into ``out/images`` and return their rows, in order (same for any ``workers``)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    make = partial(make_one, out, seed=seed, languages=languages)
    if workers <= 1:
        return [make(i) for i in range(n)]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(make, range(n), chunksize=64))


def write_metadata(out: Path, rows: list[dict], languages: tuple[str, ...]) -> None:
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "labels.json").write_text(json.dumps(labels_manifest(languages), ensure_ascii=False, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="rendering processes (output is the same for any)")
    p.add_argument("--languages", default=",".join(LANGUAGES), help="comma-separated, cycled over images")
    args = p.parse_args(argv)
    languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    unknown = sorted(set(languages) - set(LANGUAGES))
    if unknown or not languages:
        p.error(f"unknown languages {unknown}; choose from {', '.join(LANGUAGES)}")
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    rows = generate(args.out, args.n, args.seed, languages, args.workers)
    write_metadata(args.out, rows, languages)
    print(f"wrote {len(rows)} images + captions.csv + labels.json to {args.out}")


if __name__ == "__main__":
    main()
