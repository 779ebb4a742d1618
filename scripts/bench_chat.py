"""Benchmark ``ChatModel.stream`` against a bare transformers ``generate`` on the same inputs.

Both runs use the same prompt ids, pixel values and greedy generation config; the script reports time to
first token (TTFT) and decode throughput (tokens/s) of each, and their ratio (stream / bare), measured side
by side in one run (alternating, after a warm-up).

    python scripts/bench_chat.py --model tests/fixtures/internvl_chat_tiny
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from chat import ChatModel, load_chat_model


class FirstTokenTimer(BaseStreamer):
    """Records when generate() emits its first new token (the first put() carries the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def bare_generate(model: ChatModel, query: str, pixel_values: torch.Tensor | None, max_new_tokens: int):
    """Plain ``InternVLForConditionalGeneration.generate`` on the tokenized prompt: (ttft, seconds, ids)."""
    inputs = {k: v.to(model.device) for k, v in model.encode([query]).items()}
    extra = {} if pixel_values is None else {"pixel_values": pixel_values.to(model.device, model.dtype)}
    timer = FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.model.generate(
            **inputs,
            **extra,
            streamer=timer,
            generation_config=model.generation_config(max_new_tokens=max_new_tokens),
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    return (timer.first or end) - start, end - start, ids


def chat_stream(model: ChatModel, question: str, pixel_values: torch.Tensor | None, max_new_tokens: int):
    """``ChatModel.stream``: (ttft, seconds, text)."""
    start = time.perf_counter()
    first = None
    pieces = []
    for piece in model.stream(question, pixel_values=pixel_values, max_new_tokens=max_new_tokens):
        if first is None:
            first = time.perf_counter()
        pieces.append(piece)
    end = time.perf_counter()
    return (first or end) - start, end - start, "".join(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="InternVL-Chat folder (original or HF-native format)")
    parser.add_argument(
        "--image", help="image file (default: the folder's images/wide.png if any, else none)"
    )
    parser.add_argument("--question", default="What is in this picture?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-num-tiles", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_chat_model(args.model, device=args.device)
    image_path = Path(args.image) if args.image else Path(args.model) / "images" / "wide.png"
    pixel_values = None
    if args.image or image_path.is_file():
        pixel_values, _ = model.tile_images([Image.open(image_path)], args.max_num_tiles)
    query = model.build_prompt(args.question, [len(pixel_values)] if pixel_values is not None else None)

    # warm-up, and a check that both paths produce the same answer
    _, _, ids = bare_generate(model, query, pixel_values, args.max_new_tokens)
    _, _, text = chat_stream(model, args.question, pixel_values, args.max_new_tokens)
    n_tokens = len(ids)
    if text != model.decode(ids):
        raise SystemExit(f"stream and generate disagree: {text!r} vs {model.decode(ids)!r}")

    bare, stream = [], []
    for _ in range(args.repeats):  # alternate so both see the same machine load
        bare.append(bare_generate(model, query, pixel_values, args.max_new_tokens)[:2])
        stream.append(chat_stream(model, args.question, pixel_values, args.max_new_tokens)[:2])

    def summary(runs: list[tuple[float, float]]) -> tuple[float, float]:
        ttft = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] - r[0] for r in runs)
        return ttft, (n_tokens - 1) / decode if decode > 0 and n_tokens > 1 else float("nan")

    b_ttft, b_tps = summary(bare)
    s_ttft, s_tps = summary(stream)
    tiles = 0 if pixel_values is None else len(pixel_values)
    prompt_len = len(model.encode([query])["input_ids"][0])
    print(
        f"model {args.model} on {model.device} ({model.dtype}); prompt {prompt_len} tokens, {tiles} tiles, "
        f"{n_tokens} new tokens, median of {args.repeats}"
    )
    print(f"{'':24}{'TTFT ms':>10}{'decode tok/s':>15}")
    print(f"{'bare generate':24}{b_ttft * 1e3:>10.1f}{b_tps:>15.1f}")
    print(f"{'ChatModel.stream':24}{s_ttft * 1e3:>10.1f}{s_tps:>15.1f}")
    print(f"{'ratio stream / bare':24}{s_ttft / b_ttft:>10.2f}{s_tps / b_tps:>15.2f}")


if __name__ == "__main__":
    main()
