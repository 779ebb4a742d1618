"""Zero-shot colour+shape classification per language and text-to-image recall on a labelled folder.

    python scripts/eval_zero_shot.py --model demo --data data/shapes_test

The folder is one written by ``generate_shapes.py``: ``captions.csv`` (file, caption, language, shape,
colour, ...) and ``labels.json`` (class labels and prompt templates per language). Classification uses
``retrieval.zero_shot.classify`` over all colour x shape classes, once per label language. In recall, a
retrieved image counts as relevant when it has the query caption's colour and shape (the gallery holds many
images per class); exact-pair recall is reported too. ``--pil-n`` adds a generalisation check on shapes
drawn with plain PIL calls on a white background (code the training renderer does not share).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from retrieval import load_encoder
from retrieval.images import ImageDecodeError, open_image
from retrieval.training import find_captions, read_records, recall_at_k
from retrieval.zero_shot import classify

logger = logging.getLogger("eval_zero_shot")
LANG_COLUMNS = {"en": "EN", "zh": "ZH", "ja": "JP", "es": "ES", "fr": "FR"}


# --- reading ------------------------------------------------------------------------------------------------
def load_labelled_folder(
    data: Path, captions: Path | None = None
) -> tuple[list[Image.Image], list[dict], dict]:
    """Images, their records and labels.json; unreadable images are skipped and counted."""
    records = read_records(captions or find_captions(data), required=("file", "caption", "shape", "colour"))
    manifest_path = data / "labels.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} missing: generate the folder with scripts/generate_shapes.py"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    images, kept, skipped = [], [], 0
    for rec in records:
        try:
            images.append(open_image(data / rec["file"]))
            kept.append(rec)
        except ImageDecodeError as exc:
            skipped += 1
            logger.warning("skipping %s: %s", rec["file"], exc)
    if skipped:
        logger.warning("skipped %d unreadable images of %d", skipped, len(records))
    if not kept:
        raise ValueError(f"{data}: no readable images")
    return images, kept, manifest


# --- the PIL-drawn generalisation set -------------------------------------------------------------
PIL_COLOURS = {
    "red": "red",
    "orange": "orange",
    "yellow": "gold",
    "green": "green",
    "blue": "blue",
    "purple": "purple",
    "pink": "hotpink",
    "black": "black",
}


def draw_pil_shape(shape: str, colour: str, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """One shape drawn with ImageDraw primitives, centred-ish on white."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    c = PIL_COLOURS[colour]
    r = size * rng.uniform(0.25, 0.38)
    cx, cy = size / 2 + rng.uniform(-8, 8), size / 2 + rng.uniform(-8, 8)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=c)
    elif shape == "triangle":
        d.regular_polygon((cx, cy, r), 3, fill=c)
    elif shape == "hexagon":
        d.regular_polygon((cx, cy, r), 6, fill=c)
    elif shape == "star":
        pts = [
            (
                cx + (r if k % 2 == 0 else 0.42 * r) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else 0.42 * r) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        d.polygon(pts, fill=c)
    elif shape == "cross":
        a = 0.33 * r
        d.rectangle((cx - a, cy - r, cx + a, cy + r), fill=c)
        d.rectangle((cx - r, cy - a, cx + r, cy + a), fill=c)
    elif shape == "heart":
        q = r / 2
        d.ellipse((cx - r, cy - r * 0.75, cx, cy - r * 0.75 + r), fill=c)
        d.ellipse((cx, cy - r * 0.75, cx + r, cy - r * 0.75 + r), fill=c)
        d.polygon([(cx - r * 0.97, cy - q * 0.25), (cx + r * 0.97, cy - q * 0.25), (cx, cy + r)], fill=c)
    else:
        raise ValueError(f"no PIL drawing for shape {shape!r}")
    return img


def pil_check_set(classes: list[str], per_class: int, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """``per_class`` PIL-drawn images of each ``"colour shape"`` class, with their class indices."""
    rng = random.Random(seed)
    images, targets = [], []
    for idx, cls in enumerate(classes):
        colour, shape = cls.split(" ", 1)
        for _ in range(per_class):
            images.append(draw_pil_shape(shape, colour, size=rng.choice([64, 96, 128]), rng=rng))
            targets.append(idx)
    return images, targets


# --- metrics --------------------------------------------------------------------------------------
def evaluate(
    encoder,
    images: list[Image.Image],
    records: list[dict],
    manifest: dict,
    *,
    pil_per_class: int = 2,
    batch_size: int = 64,
) -> dict:
    """Accuracy per label language, recall@1/5/10 (per caption language and overall), PIL check."""
    classes = manifest["classes"]
    class_of = {name: i for i, name in enumerate(classes)}
    targets = np.array([class_of[f"{r['colour']} {r['shape']}"] for r in records])
    out: dict = {"n_images": len(images), "n_classes": len(classes), "accuracy": {}, "recall": {}}
    img_emb = encoder.encode_images(images, batch_size=batch_size)
    for lang, spec in manifest["languages"].items():
        probs = classify(encoder, img_emb, spec["labels"], spec["templates"])
        out["accuracy"][lang] = float((np.asarray(probs).argmax(1) == targets).mean())
    txt_emb = encoder.encode_texts([r["caption"] for r in records], batch_size=batch_size)
    sims = txt_emb @ img_emb.T
    relevant = targets[:, None] == targets[None, :]
    langs = np.array([r.get("language", "all") for r in records])
    out["recall"]["all"] = recall_at_k(sims, relevant)
    out["recall_exact_pair"] = recall_at_k(sims, np.eye(len(records), dtype=bool))
    for lang in sorted(
        set(langs), key=lambda x: (list(LANG_COLUMNS).index(x) if x in LANG_COLUMNS else 99, x)
    ):
        sel = langs == lang
        out["recall"][lang] = recall_at_k(sims[sel], relevant[sel])
    if pil_per_class > 0:
        pil_images, pil_targets = pil_check_set(classes, pil_per_class)
        en = manifest["languages"].get("en") or next(iter(manifest["languages"].values()))
        probs = classify(encoder, pil_images, en["labels"], en["templates"])
        pred = np.asarray(probs).argmax(1)
        out["pil"] = {
            "n_images": len(pil_images),
            "accuracy": float((pred == np.array(pil_targets)).mean()),
            "chance": 1.0 / len(classes),
        }
    return out


def markdown_tables(name: str, m: dict) -> str:
    """The metrics as the InternVL README's tables (percent, one decimal)."""
    langs = list(m["accuracy"])
    cols = [LANG_COLUMNS.get(lang, lang.upper()) for lang in langs]
    avg = sum(m["accuracy"].values()) / len(langs)
    lines = [
        f"Zero-shot colour+shape classification ({m['n_images']} images, {m['n_classes']} classes)",
        "",
        "| method | " + " | ".join(cols) + " | avg |",
        "|---" * (len(cols) + 2) + "|",
        f"| {name} | " + " | ".join(f"{100 * m['accuracy'][x]:.1f}" for x in langs) + f" | {100 * avg:.1f} |",
        "",
        "Text-to-image retrieval (relevant = same colour and shape)",
        "",
        "| method | captions | R@1 | R@5 | R@10 |",
        "|---|---|---|---|---|",
    ]
    for lang, r in m["recall"].items():
        label = "all" if lang == "all" else LANG_COLUMNS.get(lang, lang.upper())
        lines.append(f"| {name} | {label} | {100 * r[1]:.1f} | {100 * r[5]:.1f} | {100 * r[10]:.1f} |")
    e = m["recall_exact_pair"]
    lines.append(f"| {name} | all, exact pair | {100 * e[1]:.1f} | {100 * e[5]:.1f} | {100 * e[10]:.1f} |")
    if "pil" in m:
        p = m["pil"]
        lines += [
            "",
            f"PIL-drawn shapes (unseen renderer, EN labels): {100 * p['accuracy']:.1f}% "
            f"of {p['n_images']} (chance {100 * p['chance']:.1f}%)",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help='model folder, or "demo"')
    p.add_argument("--data", type=Path, required=True, help="folder written by generate_shapes.py")
    p.add_argument("--captions", type=Path, default=None, help="captions file (default DATA/captions.csv)")
    p.add_argument("--mode", default=None, help="encoder mode (internvl-c / internvl-g)")
    p.add_argument("--pil-n", type=int, default=2, help="PIL-drawn images per class (0 = skip)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    encoder = load_encoder(args.model, mode=args.mode)
    images, records, manifest = load_labelled_folder(args.data, args.captions)
    metrics = evaluate(
        encoder, images, records, manifest, pil_per_class=args.pil_n, batch_size=args.batch_size
    )
    metrics["model"] = str(args.model)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    print(markdown_tables(Path(str(args.model)).name or str(args.model), metrics))
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    return metrics


if __name__ == "__main__":
    main()
