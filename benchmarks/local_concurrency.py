"""Throughput of the continuous-batching engine with 1, 2, 4 and 8 concurrent streams.

The model is the SmolVLM2-256M architecture with random weights in fp32 (the checkpoint is made
once and cached under ``~/.cache/mlx_smolvlm``, see `random_checkpoint`). Each stream asks a
different text question (about 30 prompt tokens; ``--image`` adds one 512x512 image tile per
prompt) and generates ``--max-tokens`` tokens, ignoring EOS. For each concurrency, all streams
start together; the figures are medians over ``--repeats`` rounds (the concurrencies are
interleaved round by round, so a burst of load on a shared machine hits all of them alike):

- total tok/s: every generated token over the wall time from the first request to the last
  token;
- decode tok/s: the same, counted from the moment every stream has its first token (the
  batch at full size);
- TTFT: each stream's time to first token (mean and worst).

Usage::

    python -m benchmarks.local_concurrency [--max-tokens 64] [--repeats 3] [--image]

Writes ``benchmarks/results/local_concurrency.json``.
"""

# mlx_smolvlm goes first: it loads the optimized BLAS, which must happen before mlx.core.
from __future__ import annotations  # noqa: I001

import argparse
import asyncio
import logging
import platform
import statistics
import time
from pathlib import Path

import mlx_smolvlm
import mlx.core as mx
from PIL import Image

from benchmarks import RESULTS, write_json
from mlx_smolvlm.engine import Engine, EngineConfig, SamplingParams
from mlx_smolvlm.load import load
from mlx_smolvlm.random_weights import random_checkpoint

CONCURRENCY = (1, 2, 4, 8)
QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it is moving, in simple words.",
    "List some good reasons to learn a second language as an adult, with examples.",
    "Describe the water cycle to a ten year old who likes football and dinosaurs.",
    "What should I pack for a week of hiking in the mountains in early autumn?",
    "Give me a recipe for a vegetable soup that can be cooked in half an hour.",
    "Summarise the plot of a detective novel you would like to write one day.",
    "Compare trains and planes for a trip of five hundred kilometres in Europe.",
]


async def one_stream(engine: Engine, prompt: list[dict], images: list, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, produced = None, 0
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    async for output in engine.generate(prompt, images, params=params):
        if first is None:
            first = time.perf_counter()
        produced = output.generation_tokens  # the tokens actually generated, not the limit
    return {"start": start, "first": first, "end": time.perf_counter(), "tokens": produced}


async def one_round(engine: Engine, n: int, max_tokens: int, image: Image.Image | None) -> dict:
    content = [{"type": "image"}] if image else []
    prompts = [
        [{"role": "user", "content": content + [{"type": "text", "text": QUESTIONS[k]}]}]
        for k in range(n)
    ]
    images = [image] if image else []
    streams = await asyncio.gather(*(one_stream(engine, p, images, max_tokens) for p in prompts))
    start = min(s["start"] for s in streams)
    end = max(s["end"] for s in streams)
    all_first = max(s["first"] for s in streams)
    tokens = sum(s["tokens"] for s in streams)
    # Every stream's tokens after its first.
    decode_tokens = tokens - n
    return {
        "total_tps": tokens / (end - start),
        "decode_tps": decode_tokens / (end - all_first) if end > all_first else float("nan"),
        "ttft_mean_s": statistics.mean(s["first"] - s["start"] for s in streams),
        "ttft_max_s": max(s["first"] - s["start"] for s in streams),
        "wall_s": end - start,
    }


async def run(args: argparse.Namespace) -> dict:
    checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint("256m")
    model, processor = load(str(checkpoint))
    engine = Engine(model, processor, EngineConfig(max_sequences=max(CONCURRENCY)))
    # One 512x512 image is a single tile (the longest edge fits one tile after resizing).
    image = Image.new("RGB", (512, 512), (90, 140, 200)) if args.image else None
    try:
        logging.info("warming up")
        await one_round(engine, 2, 8, image)
        rounds: dict[int, list[dict]] = {n: [] for n in CONCURRENCY}
        for r in range(1, args.repeats + 1):
            for n in CONCURRENCY:
                logging.info("round %d/%d, %d streams: running", r, args.repeats, n)
                result = await one_round(engine, n, args.max_tokens, image)
                rounds[n].append(result)
                logging.info(
                    "round %d/%d, %d streams: %.1f tok/s in total, TTFT max %.2f s, %.1f s",
                    r,
                    args.repeats,
                    n,
                    result["total_tps"],
                    result["ttft_max_s"],
                    result["wall_s"],
                )
    finally:
        engine.close()
    rows = []
    for n, results in rounds.items():
        row = {"streams": n}
        for key in results[0]:
            row[key] = statistics.median(r[key] for r in results)
        rows.append(row)
    single = rows[0]["total_tps"]
    for row in rows:
        row["speedup"] = row["total_tps"] / single
    return {
        "model": (
            f"{checkpoint.name}, float32"
            if args.checkpoint
            else "SmolVLM2-256M architecture, random weights, float32"
        ),
        "checkpoint": str(checkpoint),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "image": bool(args.image),
        "blas": mlx_smolvlm.BLAS,
        "mlx": mx.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "rows": rows,
    }


def print_table(report: dict) -> None:
    print(
        f"{report['model']}, {report['max_tokens']} tokens per stream, "
        f"median of {report['repeats']}{', one image tile per prompt' if report['image'] else ''}"
    )
    print(
        f"{'streams':>7} | {'total tok/s':>11} | {'x one stream':>12} | {'decode tok/s':>12} | "
        f"{'TTFT mean s':>11} | {'TTFT max s':>10}"
    )
    for row in report["rows"]:
        print(
            f"{row['streams']:>7} | {row['total_tps']:>11.1f} | {row['speedup']:>12.2f} | "
            f"{row['decode_tps']:>12.1f} | {row['ttft_mean_s']:>11.3f} | {row['ttft_max_s']:>10.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", action="store_true", help="one image tile per prompt")
    parser.add_argument("--checkpoint", help="another checkpoint (default: random 256M)")
    parser.add_argument("--json", default=str(RESULTS / "local_concurrency.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = asyncio.run(run(args))
    print_table(report)
    write_json(report, Path(args.json))


if __name__ == "__main__":
    main()
