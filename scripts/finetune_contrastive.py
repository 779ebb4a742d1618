"""Contrastive (CLIP-style) training / fine-tuning of an InternVL-C-format model on image-caption pairs.

    # fresh tiny model (the bundled demo model; see retrieval/demo_model/README.md for the exact command)
    python scripts/finetune_contrastive.py --data data/shapes_train --preset demo --out runs/demo
    # fine-tune an existing checkpoint folder
    python scripts/finetune_contrastive.py --data my_pairs --init path/to/InternVL-C --out runs/ft --lr 1e-5

Data: a folder plus ``captions.csv`` / ``captions.jsonl`` with columns ``file`` (relative to the folder)
and ``caption``. Loss: symmetric InfoNCE over each micro-batch with the model's learnable ``logit_scale``
(clamped to ln 100 as CLIP does); AdamW; linear warm-up then cosine decay; gradient accumulation.
Images go through the encoder's own ``build_transform("retrieval", size)`` once and are cached;
``--augment-shift`` adds small random translations during training only (evaluation stays exact).
The output folder (config.json, model.safetensors, tokenizer files, training.json) is what
``retrieval.load_encoder`` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from retrieval.images import ImageDecodeError, open_image
from retrieval.internvl import InternVLConfig, InternVLModel, InternVLTokenizer, build_transform
from retrieval.training import (
    PRESETS,
    BatchSampler,
    clamp_logit_scale_,
    contrastive_loss,
    find_captions,
    load_weights,
    merge_config,
    mimetic_attention_init_,
    random_shift,
    read_records,
    recall_at_k,
    save_checkpoint,
    sharpen_attention_pooling_,
    sincos_position_embedding_,
    trim_padding,
    warmup_cosine,
)

logger = logging.getLogger("finetune_contrastive")
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "internvl_cg_tiny"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- reading --------------------------------------------------------------------------------------
class PairImages(Dataset):
    """Index -> (index, transformed image or None when the file cannot be decoded)."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        try:
            return i, self.transform(open_image(self.paths[i]))
        except ImageDecodeError as exc:
            logger.warning("skipping %s: %s", self.paths[i], exc)
            return i, None


def _collate(items: list) -> tuple[list[int], torch.Tensor | None]:
    """(indices of the readable images, their stacked tensor): one shared buffer per batch, not per image."""
    good = [(i, t) for i, t in items if t is not None]
    return [i for i, _ in good], (torch.stack([t for _, t in good]) if good else None)


def load_pairs(data: Path, captions: Path | None, transform, workers: int, desc: str):
    """Decode + transform every image once -> (pixels (N,3,S,S), captions, records); bad files skipped."""
    records = read_records(captions or find_captions(data))
    paths = [data / r["file"] for r in records]
    loader = DataLoader(PairImages(paths, transform), batch_size=64, num_workers=workers, collate_fn=_collate)
    kept: list[int] = []
    pixels: torch.Tensor | None = None
    for good, batch in tqdm(loader, desc=f"preprocessing {desc}", unit="batch", leave=False):
        if batch is None:
            continue
        if pixels is None:  # one allocation; batches are copied in and their shared buffers released
            pixels = torch.empty((len(records), *batch.shape[1:]), dtype=batch.dtype)
        pixels[len(kept) : len(kept) + len(good)] = batch
        kept += good
    if len(kept) < len(records):
        logger.warning(
            "%s: skipped %d of %d images that could not be read", desc, len(records) - len(kept), len(records)
        )
    if pixels is None or not kept:
        raise ValueError(f"{data}: no readable images")
    rows = [records[i] for i in kept]
    pixels = pixels if len(kept) == len(records) else pixels[: len(kept)].clone()
    return pixels, [r["caption"] for r in rows], rows


# --- model ----------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> tuple[InternVLModel, InternVLConfig, Path]:
    """From ``--init`` folder (strict load), or a fresh model from ``--config`` JSON / ``--preset``."""
    if args.init:
        config = InternVLConfig.from_pretrained(args.init)
        model = InternVLModel(config)
        load_weights(model, args.init)
        return model.float(), config, Path(args.tokenizer or args.init)
    base = InternVLConfig().to_dict()
    overrides = json.loads(Path(args.config).read_text()) if args.config else PRESETS[args.preset]
    config = InternVLConfig.from_dict(merge_config(base, overrides))
    model = InternVLModel(config).float()
    if args.sincos_pos:
        sincos_position_embedding_(model)
    if args.mimetic_init:
        mimetic_attention_init_(model, seed=args.seed)
    if args.pool_qk_std:
        sharpen_attention_pooling_(model, args.pool_qk_std)
    return model, config, Path(args.tokenizer or FIXTURE_TOKENIZER)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, biases, embeddings, layer scales, logit_scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "embed" in name or "logit_scale" in name or "query_tokens" in name
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_loss(
    model: InternVLModel, pixels: torch.Tensor, ids: torch.Tensor, g_weight: float
) -> torch.Tensor:
    """InfoNCE of the C image embedding + ``g_weight`` x InfoNCE of the G embedding (one vision pass)."""
    tokens = model.vision_tokens(pixels)  # (B, 1+g², Cv)
    text = model.encode_text(ids)  # (B, D)
    image_c = model.clip_projector(tokens)  # (B, D)
    loss = contrastive_loss(image_c, text, model.logit_scale)
    if g_weight > 0:
        norm = torch.nn.functional.normalize
        queries = model.clip_projector2(model.query_hidden_states(tokens))  # (B, D)
        image_g = norm(queries, dim=-1) + norm(image_c, dim=-1)
        loss = loss + g_weight * contrastive_loss(image_g, text, model.logit_scale)
    return loss


class SubsetSampler:
    """Shuffled batches of a fixed subset of sample indices."""

    def __init__(self, subset: np.ndarray, batch_size: int, seed: int) -> None:
        self.subset, self.inner = subset, BatchSampler(len(subset), batch_size, seed)

    def next(self) -> np.ndarray:
        return self.subset[self.inner.next()]


def curriculum_sampler(args: argparse.Namespace, records: list[dict]) -> SubsetSampler | None:
    """Sampler over the ``--curriculum COLUMN=V1,V2`` subset used for the first ``--curriculum-steps``."""
    if not args.curriculum or args.curriculum_steps <= 0:
        return None
    column, _, values = args.curriculum.partition("=")
    if column not in records[0] or not values:
        raise ValueError(f"--curriculum wants COLUMN=V1,V2 with a captions column; got {args.curriculum!r}")
    keep = set(values.split(","))
    subset = np.array([i for i, r in enumerate(records) if str(r[column]) in keep])
    if len(subset) == 0:
        raise ValueError(f"--curriculum {args.curriculum!r} selects no records")
    return SubsetSampler(subset, args.batch_size, args.seed + 1)


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def embed(model: InternVLModel, pixels: torch.Tensor, ids: torch.Tensor, batch: int = 256):  # noqa: ANN201
    """L2-normalised C-mode image and text embeddings, float32 numpy."""
    model.eval()
    img = torch.cat([model.encode_image_c(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
    txt = torch.cat([model.encode_text(trim_padding(ids[i : i + batch])) for i in range(0, len(ids), batch)])
    model.train()
    norm = torch.nn.functional.normalize
    return norm(img.float(), dim=-1).numpy(), norm(txt.float(), dim=-1).numpy()


def text_to_image_recall(model, pixels, ids, records, match: list[str]) -> dict[int, float]:
    """Recall@1/5 of each caption's image; with ``match`` columns, any image equal on them counts."""
    img, txt = embed(model, pixels, ids)
    if match:
        keys = np.array(["\x1f".join(str(r.get(c, "")) for c in match) for r in records])
        relevant = keys[:, None] == keys[None, :]
    else:
        relevant = np.eye(len(records), dtype=bool)
    return recall_at_k(txt @ img.T, relevant, ks=(1, 5))


# --- training -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="image folder with captions.csv/.jsonl")
    p.add_argument("--captions", type=Path, default=None, help="captions file (default DATA/captions.*)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--init", type=Path, default=None, help="existing InternVL-C/G folder to fine-tune")
    src.add_argument("--config", type=Path, default=None, help="JSON config overrides for a fresh model")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="fresh-model preset (no --init)")
    p.add_argument("--sincos-pos", action="store_true", help="fresh model: 2-D sin-cos position init")
    p.add_argument("--mimetic-init", action="store_true", help="fresh model: mimetic self-attention init")
    p.add_argument(
        "--pool-qk-std", type=float, default=0.0, help="fresh model: pooling q/k init std (0 = from config)"
    )
    p.add_argument("--tokenizer", type=Path, default=None, help="folder with tokenizer files")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="micro-batch (negatives per InfoNCE)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--hard-negatives", default="", metavar="COLUMN", help="draw each batch from a few groups")
    p.add_argument("--groups-per-batch", type=int, default=2, help="groups per batch with --hard-negatives")
    p.add_argument("--curriculum", default="", metavar="COL=V1,V2", help="train on this subset first")
    p.add_argument("--curriculum-steps", type=int, default=0, help="steps on the --curriculum subset")
    p.add_argument("--g-loss-weight", type=float, default=0.0, help="also train the InternVL-G image branch")
    p.add_argument("--augment-shift", type=int, default=0, help="max random shift in pixels (train only)")
    p.add_argument("--eval-data", type=Path, default=None, help="held-out folder for periodic recall")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0 = end only)")
    p.add_argument("--eval-match", default="", help="columns that make an image relevant, e.g. colour,shape")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0 = end only)")
    p.add_argument("--save-dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers for preprocessing")
    args = p.parse_args(argv)
    if args.init and (args.sincos_pos or args.mimetic_init or args.pool_qk_std):
        p.error("--sincos-pos, --mimetic-init and --pool-qk-std are for fresh models, not --init")
    if args.pool_qk_std < 0:
        p.error("--pool-qk-std must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train, save, and return ``{seconds, history, out, model}``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()

    captions_file = args.captions or find_captions(args.data)  # fail on bad data before building the model
    model, config, tok_dir = build_model(args)
    tokenizer = InternVLTokenizer.from_pretrained(tok_dir)
    transform = build_transform("retrieval", config.image_size)
    pixels, captions, records = load_pairs(args.data, captions_file, transform, args.workers, "train")
    ids = tokenizer(captions)
    if int(((ids > 0).sum(1) == ids.shape[1]).sum()):
        logger.warning(
            "%d captions were truncated to %d tokens",
            int(((ids > 0).sum(1) == ids.shape[1]).sum()),
            ids.shape[1],
        )
    evalset = None
    if args.eval_data:
        e_pix, e_caps, e_recs = load_pairs(args.eval_data, None, transform, args.workers, "eval")
        evalset = (e_pix, tokenizer(e_caps), e_recs)
    match = [c.strip() for c in args.eval_match.split(",") if c.strip()]

    n = len(captions)
    per_step = args.batch_size * args.accum
    steps = args.steps or max(1, math.ceil(args.epochs * n / per_step))
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = warmup_cosine(optimizer, min(args.warmup, steps // 2), steps, args.min_lr_ratio)
    if args.hard_negatives and args.hard_negatives not in records[0]:
        raise ValueError(f"--hard-negatives: the captions file has no column {args.hard_negatives!r}")
    groups = [str(r[args.hard_negatives]) for r in records] if args.hard_negatives else None
    sampler = BatchSampler(n, args.batch_size, args.seed, groups, args.groups_per_batch)
    first = curriculum_sampler(args, records)
    aug_gen = torch.Generator().manual_seed(args.seed)
    history: list[dict] = []
    model.train()
    bar = tqdm(range(steps), desc="train", unit="step")
    for step in bar:
        t0, total = time.perf_counter(), 0.0
        for _ in range(args.accum):
            idx = torch.from_numpy((first if first and step < args.curriculum_steps else sampler).next())
            px = random_shift(pixels[idx], args.augment_shift, aug_gen)
            loss = batch_loss(model, px, trim_padding(ids[idx]), args.g_loss_weight) / args.accum
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        clamp_logit_scale_(model.logit_scale)
        bar.set_postfix(
            loss=f"{total:.3f}",
            lr=f"{scheduler.get_last_lr()[0]:.2e}",
            scale=f"{model.logit_scale.exp().item():.1f}",
            img_s=f"{per_step / (time.perf_counter() - t0):.0f}",
        )
        history.append({"step": step + 1, "loss": round(total, 5)})
        last = step + 1 == steps
        if evalset is not None and ((args.eval_every and (step + 1) % args.eval_every == 0) or last):
            r = text_to_image_recall(model, *evalset, match)
            history[-1].update({"recall@1": r[1], "recall@5": r[5]})
            tqdm.write(
                f"step {step + 1}: loss {total:.4f}  text->image R@1 {100 * r[1]:.1f}  R@5 {100 * r[5]:.1f}"
            )
        if last or (args.save_every and (step + 1) % args.save_every == 0):
            info = {
                "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                "args": {k: str(v) for k, v in vars(args).items()},
                "train_pairs": n,
                "steps": step + 1,
                "seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(time.process_time() - cpu_start, 1),
                "history": history,
            }
            save_checkpoint(model, config.to_dict(), args.out, tok_dir, DTYPES[args.save_dtype], extra=info)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    print(
        f"trained {steps} steps on {n} pairs in {seconds / 60:.1f} min wall ({cpu / 60:.1f} min CPU time); "
        f"final loss {history[-1]['loss']:.4f}; saved to {args.out}"
    )
    return {"seconds": seconds, "history": history, "out": str(args.out), "model": model.eval()}


if __name__ == "__main__":
    main()
