"""Train the bundled demo chat model (``chat.load_chat_model("demo")``) on shape-world questions.

    python scripts/train_demo_chat.py --out chat/demo_model --seed 0

A tiny InternVL-Chat in the original checkpoint format: InternViT initialised from the demo encoder's vision
tower (``retrieval/demo_model``, position embedding resized once from 7x7 to 8x8 patches), the pixel-shuffle
``mlp1`` projector and a small Qwen2 LLM with tied embeddings, template Hermes-2 and the LLaMA
sentencepiece tokenizer of ``tests/fixtures/internvl_chat_qwen2_tiny``. Trained as transformers' native
``InternVLForConditionalGeneration`` (the class ``load_chat_model`` converts original folders into) with the
loss on answer tokens plus a grounding loss on an intermediate layer (``training_losses``: what each image
shows and what the question asks about, named in English words), then written back in the original layout
(``chat.convert.original_state_dict``). The grounding loss only shapes training; the checkpoint and the
inference path are those of any InternVL-Chat model. Samples come from ``chat_shapes.py``; everything is a
pure function of ``--seed`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import chat_shapes as cs  # noqa: E402

from chat.convert import convert_state_dict, native_config, original_state_dict  # noqa: E402
from chat.prompt import build_query, load_tokenizer, tokenize_batch  # noqa: E402
from chat.templates import get_template  # noqa: E402
from chat.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

logger = logging.getLogger("train_demo_chat")

ENCODER_DIR = ROOT / "retrieval" / "demo_model"
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "internvl_chat_qwen2_tiny"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SYSTEM_MESSAGE = "You are a helpful assistant that answers questions about coloured shapes."
IMAGE_SIZE = 64
TEMPLATE = "Hermes-2"
#: question kinds drawn with these weights (which-image is the slowest to learn, colour the fastest)
DEFAULT_WEIGHTS = "colour=0.4,shape=1.2,colour_shape=0.4,count=1.4,position=1.2,yesno=1.0,which=3.0"


def model_config(
    hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, init_range: float = 0.08
) -> dict:
    """The original-format ``config.json`` (``model_type: internvl_chat``)."""
    vision = json.loads((ENCODER_DIR / "config.json").read_text())["vision_config"]
    vision = {
        **vision,
        "image_size": IMAGE_SIZE,
        "architectures": ["InternVisionModel"],
        "use_flash_attn": False,
    }
    tok = json.loads((TOKENIZER_DIR / "added_tokens.json").read_text())
    llm = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 32000 + len(tok),
        "bos_token_id": tok["<|endoftext|>"], "eos_token_id": tok["<|im_end|>"], "tie_word_embeddings": True,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
        "attention_dropout": 0.0, "initializer_range": init_range, "use_cache": True,
        "torch_dtype": "float16",
    }  # fmt: skip
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": TEMPLATE,
        "system_message": SYSTEM_MESSAGE, "downsample_ratio": 0.5, "dynamic_image_size": False,
        "use_thumbnail": False, "min_dynamic_patch": 1, "max_dynamic_patch": 1,
        "force_image_size": IMAGE_SIZE,
        "ps_version": "v2", "select_layer": -1, "tie_word_embeddings": True, "torch_dtype": "float16",
        "llm_config": llm, "vision_config": vision,
    }  # fmt: skip


def encoder_vision_state(config: dict) -> dict[str, torch.Tensor]:
    """The demo encoder's InternViT, native names, position embedding resized (bicubic) to the new grid."""
    stored = load_file(ENCODER_DIR / "model.safetensors")
    vision = {k: v.float() for k, v in stored.items() if k.startswith("vision_model.")}
    pos = vision["vision_model.embeddings.position_embedding"]  # (1, 1 + g*g, C)
    old = int(math.isqrt(pos.shape[1] - 1))
    new = IMAGE_SIZE // int(config["vision_config"]["patch_size"])
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    vision["vision_model.embeddings.position_embedding"] = torch.cat(
        [pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1
    )
    return convert_state_dict(vision, config)


def build_model(config: dict, image_token_id: int, seed: int, proj_init: float = 1.0) -> torch.nn.Module:
    """Native model: random LLM (``initializer_range`` of the config) and projector (std
    ``proj_init / sqrt(fan_in)``, zero biases), InternViT from the demo encoder."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    native = native_config(config, image_token_id=image_token_id, tie_word_embeddings=True)
    model = InternVLForConditionalGeneration(native).float()
    missing, unexpected = model.load_state_dict(encoder_vision_state(config), strict=False)
    vision_missing = [k for k in missing if k.startswith("model.vision_tower.")]
    if vision_missing or unexpected:
        raise RuntimeError(f"vision init mismatch: missing {vision_missing}, unexpected {unexpected}")
    projector = model.model.multi_modal_projector
    for linear in (projector.linear_1, projector.linear_2):
        torch.nn.init.normal_(linear.weight, std=proj_init / math.sqrt(linear.in_features))
        torch.nn.init.zeros_(linear.bias)
    return model


# --- data ---------------------------------------------------------------------------------------------
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def to_pixels(images: list) -> torch.Tensor:
    """uint8 ``(n, 3, S, S)``: the bicubic resize of ``chat.transforms.TileTransform``, before normalising."""
    from PIL import Image

    arr = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous()


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 tiles -> normalised float tiles (``TileTransform``'s ToTensor + Normalize)."""
    return (pixels.float() / 255.0 - _MEAN) / _STD


def _render_chunk(args: tuple[int, int, int, dict]) -> list[tuple]:
    """Samples ``start..stop`` of ``make_samples(seed)`` as (kind, lang, question, answer, uint8 tiles,
    objects, asked)."""
    start, stop, seed, weights = args
    out = []
    for i in range(start, stop):
        s = cs.make_samples(1, seed, weights=weights, start=i)[0]
        tiles = to_pixels(s.images).numpy()  # numpy: no file descriptors across processes
        out.append((s.kind, s.lang, s.question, s.answer, tiles, s.objects, s.asked))
    return out


def render_samples(n: int, seed: int, weights: dict, workers: int) -> list[cs.Sample]:
    """``cs.make_samples(n, seed)`` with images already resized to uint8 tiles (in ``workers`` processes;
    the same for any number)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(a, min(n, a + 500), seed, weights) for a in range(0, n, 500)]
    if workers <= 1:
        parts = [_render_chunk(c) for c in chunks]
    else:
        # spawn, not fork: a fork after torch started its OpenMP threads (--threads > 1) can hang the child
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_render_chunk, chunks))
    return [cs.Sample(k, lang, q, a, torch.from_numpy(px), obj, asked)
            for part in parts for k, lang, q, a, px, obj, asked in part]  # fmt: skip


def grounding_targets(tokenizer) -> tuple[dict[str, int], dict[int, int]]:
    """Token ids the grounding loss aims at: the first token of each English colour and shape name, and
    the digit of ``Image-k`` for k = 1..9 (as the answer spells it)."""
    words = {w: tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (*cs.COLOURS, *cs.SHAPES)}
    if len(set(words.values())) != len(words):
        raise ValueError("colour and shape names share a first token; the grounding loss needs them distinct")
    digits = {k: tokenizer(f"Image-{k}", add_special_tokens=False)["input_ids"][-1] for k in range(1, 10)}
    return words, digits


def grounding(sample: cs.Sample, ids: list[int], n_prompt: int, end_img: int, words: dict, digits: dict
              ) -> list[tuple[int, int]]:  # fmt: skip
    """(position, token) pairs of the grounding loss over prompt + answer ``ids``: at each image's
    ``</img>`` its shape and colour names (and its number k when the prompt says ``Image-k:``); at every
    position that predicts an answer token, the shape and colour the question asks about."""
    numbered = "Image-1: <image>" in sample.question
    ends = [j for j, t in enumerate(ids[:n_prompt]) if t == end_img]
    pairs = []
    for k, (j, obj) in enumerate(zip(ends, sample.objects, strict=False)):
        if obj is not None:
            pairs += [(j, words[obj[1]]), (j, words[obj[0]])] + ([(j, digits[k + 1])] if numbered else [])
    if sample.asked is not None:
        for j in range(n_prompt - 1, len(ids) - 1):
            pairs += [(j, words[sample.asked[1]]), (j, words[sample.asked[0]])]
    return pairs


def encode_samples(samples: list, tokenizer, num_image_token: int) -> list[dict]:
    """Prompt + answer token ids (labels: answer and ``<|im_end|>`` only), grounding-loss pairs and uint8
    tiles per sample (``Sample.images``: PIL images, or uint8 tiles from :func:`render_samples`)."""
    template = get_template(TEMPLATE)
    end = tokenizer.convert_tokens_to_ids(template.stop_token)
    end_img = tokenizer.convert_tokens_to_ids("</img>")
    words, digits = grounding_targets(tokenizer)
    out = []
    for s in samples:
        pixels = s.images if isinstance(s.images, torch.Tensor) else to_pixels(s.images)
        query = build_query(template, s.question, num_patches_list=[1] * len(s.images),
                            num_image_token=num_image_token, system_message=SYSTEM_MESSAGE)  # fmt: skip
        prompt = tokenize_batch(tokenizer, [query])["input_ids"][0].tolist()
        answer = tokenizer(s.answer, add_special_tokens=False)["input_ids"] + [end]
        ground = grounding(s, prompt + answer, len(prompt), end_img, words, digits)
        out.append({"ids": prompt + answer, "n_prompt": len(prompt), "pixels": pixels, "kind": s.kind,
                    "lang": s.lang, "ground": ground})  # fmt: skip
    return out


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, next-token targets (-100 outside answers), tiles in order, and
    the grounding pairs as (row, position, token) columns."""
    width = max(len(b["ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        row = torch.tensor(b["ids"])
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
        target[i, b["n_prompt"] - 1 : len(row) - 1] = row[b["n_prompt"] :]
    pixels = normalise(torch.cat([b["pixels"] for b in batch]))
    ground = [(i, j, t) for i, b in enumerate(batch) for j, t in b.get("ground", [])]
    ground_t = torch.tensor(ground, dtype=torch.long).reshape(-1, 3)
    return {"input_ids": ids, "attention_mask": mask, "target": target, "pixel_values": pixels,
            "ground": ground_t}  # fmt: skip


def batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar lengths (less padding): shuffled, sorted by length in windows of
    50 batches, cut, and the batches shuffled."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    out = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(out)
    return out


def training_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], align_layer: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer loss, grounding loss). Answer loss: cross-entropy of the answer tokens (the 32k-row head
    runs on those positions only). Grounding loss (``align_layer`` > 0): the output of LLM layer
    ``align_layer``, through the final norm and the tied head, predicts at each ``</img>`` its image's
    shape and colour names (and number), and at each answer position what the question asks about:
    the comparison of yes/no and which-image questions then only has to be learned by the layers above,
    which otherwise sit on a long plateau at chance."""
    out = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        output_hidden_states=align_layer > 0,
    )
    where = batch["target"] != -100
    answer = F.cross_entropy(model.lm_head(out.last_hidden_state[where]), batch["target"][where])
    ground = batch.get("ground")
    if align_layer <= 0 or ground is None or not len(ground):
        return answer, answer.new_zeros(())
    hidden = model.model.language_model.norm(out.hidden_states[align_layer][ground[:, 0], ground[:, 1]])
    return answer, F.cross_entropy(model.lm_head(hidden), ground[:, 2])


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(model: torch.nn.Module, config: dict, out: Path, log: dict) -> None:
    """config.json, model.safetensors (float16, original names), tokenizer files, training.json."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state = original_state_dict(state, config)
    save_file(dict(sorted(state.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out / name)
    log["sha256"] = {
        name: file_sha256(out / name) for name in ("config.json", "model.safetensors", *TOKENIZER_FILES)
    }
    (out / "training.json").write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--samples", type=int, default=48000, help="training samples (rendered once)")
    p.add_argument("--steps", type=int, default=5200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vision-lr", type=float, default=2e-4, help="learning rate of the pretrained InternViT")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--init-range", type=float, default=0.08,
                   help="LLM initializer_range (about 1/sqrt(width); 0.02 suits wide models)")
    p.add_argument("--proj-init", type=float, default=1.0, help="projector weight std x sqrt(fan_in)")
    p.add_argument("--align", type=float, default=1.0,
                   help="weight of the grounding loss (0: answers only); see training_losses")
    p.add_argument("--align-layer", type=int, default=2,
                   help="LLM layer whose output the grounding loss reads")  # fmt: skip
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="kind=weight sampling weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy CPU)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (same samples for any)")
    p.add_argument("--curriculum", type=int, default=0,
                   help="steps trained on the attribute kinds only before --late-kinds are mixed in")
    p.add_argument("--late-kinds", default="yesno,which", help="kinds held back by --curriculum")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this original-format model folder (pilots; same architecture)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--max-minutes", type=float, default=0.0, help="stop training after this long (0: no limit)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.align and not 1 <= args.align_layer <= args.layers:
        raise SystemExit(f"--align-layer must be between 1 and --layers ({args.layers}): {args.align_layer}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights / Adam moments: denormal arithmetic is very slow on CPU
    start = time.time()
    config = model_config(args.hidden, args.layers, args.heads, args.kv_heads, args.mlp, args.init_range)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    model = build_model(config, image_token_id, args.seed, args.proj_init)
    if args.init_from:
        state = {k: v.float() for k, v in load_file(args.init_from / "model.safetensors").items()}
        missing, unexpected = model.load_state_dict(convert_state_dict(state, config), strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"--init-from mismatch: missing {missing}, unexpected {unexpected}")
    num_image_token = int(model.config.image_seq_length)
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    samples = render_samples(args.samples, args.seed, weights, args.workers)
    data = encode_samples(samples, tokenizer, num_image_token)
    del samples
    logger.info("%d samples rendered and tokenized in %.0f s", len(data), time.time() - start)

    vision = [p for n, p in model.named_parameters() if n.startswith("model.vision_tower.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW([{"params": vision, "lr": args.vision_lr}, {"params": rest, "lr": args.lr}],
                            weight_decay=args.weight_decay, betas=(0.9, 0.98))  # fmt: skip
    base = [args.vision_lr, args.lr]
    rng = random.Random(args.seed)
    lengths = [len(d["ids"]) for d in data]
    late = set(args.late_kinds.split(",")) if args.curriculum else set()
    early = [i for i, d in enumerate(data) if d["kind"] not in late]
    queue: list[list[int]] = []
    in_curriculum = bool(late)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    history, smoothed, t_train = [], None, time.time()
    model.train()
    step = 0
    for step in range(1, args.steps + 1):
        scale = step / args.warmup if step <= args.warmup else 0.5 * (
            1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))  # fmt: skip
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * scale
        if in_curriculum and step > args.curriculum:
            in_curriculum, queue = False, []
            logger.info("step %d: %s mixed in", step, ", ".join(sorted(late)))
        if not queue:
            if in_curriculum:
                queue = [[early[j] for j in b] for b in batches([lengths[i] for i in early],
                                                                args.batch_size, rng)]  # fmt: skip
            else:
                queue = batches(lengths, args.batch_size, rng)
            if not queue:
                raise ValueError(f"fewer than --batch-size {args.batch_size} samples to draw batches from")
        batch = collate([data[i] for i in queue.pop()], pad_id)
        answer_loss, ground_loss = training_losses(model, batch, args.align_layer if args.align else 0)
        loss = answer_loss + args.align * ground_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        now = torch.stack([answer_loss.detach(), ground_loss.detach()])
        smoothed = now if smoothed is None else 0.95 * smoothed + 0.05 * now
        if step % args.log_every == 0 or step == args.steps:
            history.append({"step": step, "loss": round(smoothed[0].item(), 4),
                            "grounding": round(smoothed[1].item(), 4), "s": round(time.time() - t_train, 1)})
            logger.info("step %d loss %.4f grounding %.4f (%.2f s/step)", step, smoothed[0].item(),
                        smoothed[1].item(), (time.time() - t_train) / step)  # fmt: skip
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            logger.warning("time limit reached at step %d of %d", step, args.steps)
            break
    model.eval()
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "steps_done": step,
           "train_seconds": round(time.time() - t_train, 1), "total_seconds": round(time.time() - start, 1),
           "history": history}  # fmt: skip
    save(model, config, args.out, log)
    logger.info("saved %s (%.0f s in all)", args.out, time.time() - start)
    return {"model": model, "config": config, "log": log}


if __name__ == "__main__":
    main()
