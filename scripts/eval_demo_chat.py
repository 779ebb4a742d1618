"""Accuracy of a chat model on shape-world questions, per question kind and language.

    python scripts/eval_demo_chat.py --model demo --n 1400 --seed 1000

Two held-out sets, both seed-separated from training (``train_demo_chat.py`` uses ``--seed`` 0): images
rendered like the training data (``chat_shapes.py``), and the same questions over shapes drawn with plain
PIL calls (a renderer training never saw). An answer is right when it equals the expected short answer
after stripping spaces and final punctuation (case-insensitive). Prints a table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import chat_shapes as cs  # noqa: E402
from shapes_vocab import LANGUAGES  # noqa: E402

logger = logging.getLogger("eval_demo_chat")
_PUNCT = " .。!！?？"


def normalise(text: str) -> str:
    """Lower case, outer spaces and final punctuation removed."""
    return text.strip().strip(_PUNCT).strip().lower()


def is_correct(answer: str, expected: str) -> bool:
    """The answer equals the expected short answer (:func:`normalise` d)."""
    return normalise(answer) == normalise(expected)


def evaluate(chat_model, samples: list, max_new_tokens: int = 16) -> dict:
    """``{"kind": {"lang": accuracy %}}`` plus ``"all"`` per kind, and the wrong answers (up to 30)."""
    right: dict = defaultdict(lambda: defaultdict(int))
    total: dict = defaultdict(lambda: defaultdict(int))
    wrong = []
    for s in samples:
        answer = chat_model.chat(s.question, images=s.images, max_new_tokens=max_new_tokens)
        ok = is_correct(answer, s.answer)
        for lang in (s.lang, "all"):
            total[s.kind][lang] += 1
            right[s.kind][lang] += ok
        if not ok and len(wrong) < 30:
            wrong.append({"kind": s.kind, "lang": s.lang, "question": s.question, "expected": s.answer,
                          "answer": answer})  # fmt: skip
    acc = {k: {lang: round(100.0 * right[k][lang] / total[k][lang], 1) for lang in total[k]} for k in total}
    return {"accuracy": acc, "counts": {k: dict(v) for k, v in total.items()}, "wrong": wrong}


def table(result: dict, title: str) -> str:
    """Markdown table: kinds x languages."""
    langs = [lang for lang in LANGUAGES if any(lang in v for v in result["accuracy"].values())] + ["all"]
    lines = [f"{title}", "", "| kind | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
    for kind in cs.KINDS:
        if kind in result["accuracy"]:
            row = result["accuracy"][kind]
            lines.append(
                f"| {kind} | " + " | ".join(f"{row.get(lang, float('nan')):.1f}" for lang in langs) + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help='chat model folder, or "demo"')
    p.add_argument("--n", type=int, default=1400, help="questions per set (kinds and languages balanced)")
    p.add_argument("--pil-n", type=int, default=None, help="questions on PIL-drawn shapes (default: --n)")
    p.add_argument("--seed", type=int, default=1000, help="held-out seed (training uses 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from chat.loader import load_chat_model

    torch.set_num_threads(args.threads)
    model = load_chat_model(args.model, device="cpu")
    out = {}
    for name, pil, n in (("rendered", False, args.n), ("pil", True, args.pil_n or args.n)):
        start = time.time()
        samples = balanced_samples(n, args.seed + (1 if pil else 0), pil=pil)
        out[name] = evaluate(model, samples)
        title = f"{name}: {n} questions, seed {args.seed + (1 if pil else 0)} ({time.time() - start:.0f} s)"
        print(table(out[name], title) + "\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    return out


def balanced_samples(n: int, seed: int, *, pil: bool = False) -> list:
    """``n`` samples cycling through every (kind, language) pair; sample ``i`` depends on ``(seed, i)``."""
    import random

    pairs = [(k, lang) for k in cs.KINDS for lang in LANGUAGES]
    out = []
    for i in range(n):
        kind, lang = pairs[i % len(pairs)]
        out.append(cs.make_sample(kind, lang, random.Random(seed * 1_000_003 + i), pil=pil))
    return out


if __name__ == "__main__":
    main()
