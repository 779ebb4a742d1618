"""Reusable pieces of contrastive (CLIP-style) fine-tuning: data records, loss, schedule, metrics, saving.

Used by ``scripts/finetune_contrastive.py`` and ``scripts/eval_zero_shot.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: CLIP clamps the learnable temperature so that exp(logit_scale) <= 100
MAX_LOGIT_SCALE = math.log(100.0)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


class DataFormatError(ValueError):
    """A captions file is missing, malformed or lacks a required column."""


def read_records(path: str | Path, required: Sequence[str] = ("file", "caption")) -> list[dict]:
    """Rows of a ``.csv`` (header line) or ``.jsonl`` (one object per line) file, as dicts.

    Raises :class:`DataFormatError` naming the file and line for unreadable lines or missing columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: captions file not found")
    if path.suffix.lower() == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
                if not isinstance(row, dict):
                    raise DataFormatError(f"{path}:{lineno}: expected a JSON object")
                rows.append(row)
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataFormatError(f"{path}: unsupported captions format (use .csv or .jsonl)")
    for i, row in enumerate(rows):
        missing = [k for k in required if not str(row.get(k) or "").strip()]
        if missing:
            raise DataFormatError(f"{path}: record {i + 1} lacks {', '.join(missing)}")
    if not rows:
        raise DataFormatError(f"{path}: no records")
    return rows


def find_captions(data_dir: Path) -> Path:
    """The captions file of a data folder: ``captions.csv`` or ``captions.jsonl``."""
    for name in ("captions.csv", "captions.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataFormatError(f"{data_dir}: no captions.csv or captions.jsonl (pass --captions)")


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE. Embeddings ``(B, D)`` unnormalised; ``logit_scale`` is the log temperature."""
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * image_embeds @ text_embeds.t()  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@torch.no_grad()
def clamp_logit_scale_(logit_scale: nn.Parameter, max_value: float = MAX_LOGIT_SCALE) -> None:
    """In-place clamp to [0, ln 100] as CLIP does after each optimiser step."""
    logit_scale.clamp_(0.0, max_value)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to ``min_ratio`` x base LR at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recall_at_k(
    similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Query->gallery recall@k: share of queries with a relevant item among their top k.

    ``similarity`` (Q, G) scores, ``relevant`` (Q, G) boolean. Ties are broken by gallery order.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ in shape")
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files a checkpoint folder needs (raises if one is missing)."""
    for name in TOKENIZER_FILES:
        if not (src_dir / name).is_file():
            raise FileNotFoundError(f"{src_dir}: tokenizer file {name} missing")
        if (src_dir / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(src_dir / name, out_dir / name)


# --- model folders --------------------------------------------------------------------------------
#: overrides of the InternVL-14B-224px config that give the tiny CPU-trainable demo architecture
DEMO_PRESET: dict = {
    "vision_config": {
        "hidden_size": 96,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "intermediate_size": 384,
        "image_size": 56,
        "patch_size": 8,
        "initializer_factor": 1.0,  # layer scale starts at 1: no 10x damping of the residual branches
    },
    "qllama_config": {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 3,
        "intermediate_size": 176,
    },
    "clip_embed_dim": 128,
    "attn_pool_num_heads": 16,  # many narrow pooling heads: more independent "where is it" selectors
    "num_query_token": 8,
    "hidden_size": 64,
    "initializer_range": 0.1,  # ~1/sqrt(width) for these narrow layers (0.02 suits the 3200-wide original)
}
PRESETS = {"demo": DEMO_PRESET}


def merge_config(base: dict, overrides: dict) -> dict:
    """Recursive dict update (nested sub-configs merged key by key)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge_config(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def save_checkpoint(
    model: nn.Module,
    config_dict: dict,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    dtype: torch.dtype = torch.float16,
    extra: dict | None = None,
) -> Path:
    """Write config.json, model.safetensors (every parameter, in ``dtype``) and tokenizer files.

    The weights are written to a temporary file and renamed, so a crash never leaves a half-written file.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out_dir / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(
        json.dumps(config_dict, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    copy_tokenizer(Path(tokenizer_dir), out_dir)
    if extra is not None:
        (out_dir / "training.json").write_text(
            json.dumps(extra, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    logger.info("saved checkpoint to %s (%d tensors, %s)", out_dir, len(state), dtype)
    return out_dir


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Strict load of ``folder/model.safetensors`` into ``model`` (cast to the model's dtype)."""
    from safetensors.torch import load_file

    file = Path(folder) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    model.load_state_dict(load_file(str(file)), strict=True)


# --- batches --------------------------------------------------------------------------------------
def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``(B, 3, S, S)`` by up to ``max_shift`` pixels (edge-replicated border)."""
    if max_shift <= 0:
        return pixels
    b, _, s, _ = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + s, dx : dx + s] for i, (dy, dx) in enumerate(offsets)])


def trim_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """Drop the all-padding tail columns of ``(N, L)`` ids (exact for the causal text tower)."""
    length = int((input_ids > 0).sum(1).max().clamp_min(1))
    return input_ids[:, :length]


class BatchSampler:
    """Index batches: shuffled epochs, or hard-negative batches drawn from a few groups.

    With ``groups`` (one key per sample, e.g. the colour column), each batch holds samples of
    ``groups_per_batch`` randomly chosen groups only, so the contrastive loss cannot be solved by what
    the group shares and must use the other attributes. Deterministic for a given ``seed``.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        groups: Sequence[str] | None = None,
        groups_per_batch: int = 2,
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1 (got {n}, {batch_size})")
        self.n, self.batch_size = n, min(batch_size, n)
        self.rng = np.random.default_rng(seed)
        self.order, self.cursor = self.rng.permutation(n), 0
        self.pools: list[np.ndarray] = []
        if groups is not None:
            if len(groups) != n:
                raise ValueError(f"{len(groups)} group keys for {n} samples")
            keys = np.asarray(groups)
            self.pools = [np.flatnonzero(keys == k) for k in sorted(set(groups))]
            self.k = max(1, min(groups_per_batch, len(self.pools)))
            self.pool_order = [self.rng.permutation(p) for p in self.pools]
            self.pool_cursor = [0] * len(self.pools)

    def _take(self, g: int, count: int) -> np.ndarray:
        out = []
        while count > 0:
            if self.pool_cursor[g] >= len(self.pools[g]):
                self.pool_order[g], self.pool_cursor[g] = self.rng.permutation(self.pools[g]), 0
            part = self.pool_order[g][self.pool_cursor[g] : self.pool_cursor[g] + count]
            self.pool_cursor[g] += len(part)
            count -= len(part)
            out.append(part)
        return np.concatenate(out)

    def next(self) -> np.ndarray:
        """The next batch of sample indices."""
        if not self.pools:
            if self.cursor + self.batch_size > self.n:  # new epoch (the ragged tail is dropped)
                self.order, self.cursor = self.rng.permutation(self.n), 0
            self.cursor += self.batch_size
            return self.order[self.cursor - self.batch_size : self.cursor]
        chosen = self.rng.choice(len(self.pools), size=self.k, replace=False)
        sizes = [self.batch_size // self.k + (i < self.batch_size % self.k) for i in range(self.k)]
        # a small group may not fill its share without repeats: cap it at its size
        parts = [self._take(int(g), min(s, len(self.pools[g]))) for g, s in zip(chosen, sizes, strict=True)]
        return np.concatenate(parts)


@torch.no_grad()
def sharpen_attention_pooling_(model: nn.Module, std: float) -> None:
    """Re-draw the query/key weights of both attention-pooling blocks from N(0, ``std``²).

    With small q/k weights the pooling's attention is uniform, i.e. average pooling, and its gradient is
    second order in those weights: a fresh tiny model then learns *what* is in the image (colour) long
    before *where its outline is* (shape). Larger q/k weights start the pooling out selective, closer
    to max pooling. For freshly built models only.
    """
    if std <= 0:
        raise ValueError(f"pooling q/k std must be positive, got {std}")
    for block in (model.clip_projector, model.clip_projector2):
        for linear in (block.cross_attn.q, block.cross_attn.k):
            nn.init.normal_(linear.weight, std=std)


def _random_square(dim: int, gen: torch.Generator) -> torch.Tensor:
    """(dim, dim) Gaussian matrix with entry variance 1/dim."""
    return torch.randn(dim, dim, generator=gen) / math.sqrt(dim)


@torch.no_grad()
def mimetic_attention_init_(
    model: nn.Module,
    qk: tuple[float, float] = (0.7, 0.7),
    vo: tuple[float, float] = (0.4, 0.4),
    seed: int = 0,
) -> None:
    """Mimetic initialisation of InternViT's self-attention (Trockman & Kolter, ICML 2023).

    Per head, ``W_q W_k^T`` is set to the best rank-``head_dim`` approximation of ``a·Z + b·I`` and, per
    layer, ``W_v^T W_o^T`` to ``a·Z - b·I`` (``Z`` random with variance ``1/width``, ``(a, b)`` from ``qk``
    and ``vo``). Together with a sin-cos position embedding the first attention maps are then local, as a
    convolution's are, instead of uniform. For freshly built models only.
    """
    gen = torch.Generator().manual_seed(seed)
    for layer in model.vision_model.encoder.layers:
        attn = layer.attn
        dim, hd = attn.embed_dim, attn.head_dim
        eye = torch.eye(dim)
        weight = attn.qkv.weight  # (3·dim, dim): q rows, k rows, v rows
        for h in range(attn.num_heads):
            u, s, vh = torch.linalg.svd(qk[0] * _random_square(dim, gen) + qk[1] * eye)
            root = s[:hd].sqrt()
            weight[h * hd : (h + 1) * hd] = (u[:, :hd] * root).t().to(weight.dtype)  # q = x U√S
            k_rows = (vh[:hd] * root[:, None]).to(weight.dtype)  # k = x V√S
            weight[dim + h * hd : dim + (h + 1) * hd] = k_rows
        u, s, vh = torch.linalg.svd(vo[0] * _random_square(dim, gen) - vo[1] * eye)
        root = s.sqrt()
        weight[2 * dim :] = (vh * root[:, None]).to(weight.dtype)  # v = x V√S
        attn.proj.weight.copy_((u * root).to(attn.proj.weight.dtype))  # out = v √S Uᵀ = x (U S Vᵀ)ᵀ


@torch.no_grad()
def sincos_position_embedding_(model: nn.Module) -> None:
    """Initialise InternViT's position embedding with fixed 2-D sine-cosine values (MAE-style).

    Gives a freshly built tiny ViT a spatial prior from step 0; the embedding stays trainable.
    """
    emb = model.vision_model.embeddings
    dim, grid = emb.position_embedding.shape[-1], emb.grid
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angles = pos[:, None] * omega[None, :]  # (g², dim/4)
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)  # (g², dim)
    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])  # class token position: zeros
    emb.position_embedding.copy_(table[None].to(emb.position_embedding.dtype))
