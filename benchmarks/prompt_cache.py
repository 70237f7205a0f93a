"""Time to first token with the engine's prompt cache: a cold prompt, then one sharing its prefix.

An agent sends the same long system prompt (and tools) with each request. Each round builds a
system prompt of ``--prefix-tokens`` tokens that no earlier round used, sends one question
with it (cold: the whole prompt is prefilled) and then another question with the same system
prompt (warm: only the tokens after the shared prefix are prefilled). The figure is the
median over ``--repeats`` rounds of warm TTFT / cold TTFT; the target is at most 0.2.

The model is the SmolVLM2-256M architecture with random weights in fp32 (see
`random_checkpoint`); the answers do not matter, only the prefill work.

Usage::

    python -m benchmarks.prompt_cache [--prefix-tokens 2000] [--repeats 3]

Writes ``benchmarks/results/prompt_cache.json``.
"""

# mlx_smolvlm goes first: it loads the optimized BLAS, which must happen before mlx.core.
from __future__ import annotations  # noqa: I001

import argparse
import asyncio
import logging
import statistics
import time
from pathlib import Path

import mlx_smolvlm
import mlx.core as mx

from benchmarks import RESULTS, write_json
from mlx_smolvlm.engine import Engine, EngineConfig, SamplingParams
from mlx_smolvlm.generate import prepare_prompt
from mlx_smolvlm.load import load
from mlx_smolvlm.random_weights import random_checkpoint

WORDS = "tool schema agent request answer careful json field value list order".split()


def system_prompt(round_id: int, tokens: int, processor) -> str:
    """A system prompt of about `tokens` tokens that starts with the round's own id."""
    words = [f"Round {round_id}."]
    while len(processor.tokenizer.encode(" ".join(words))) < tokens:
        words += WORDS
    return " ".join(words)


async def ttft(engine: Engine, system: str, question: str) -> tuple[float, int]:
    """Seconds to the first token of one request, and its prompt tokens."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]
    prompt = prepare_prompt(engine.processor, messages)
    start = time.perf_counter()
    async for _ in engine.generate(prompt, params=SamplingParams(max_tokens=1)):
        pass
    return time.perf_counter() - start, len(prompt.input_ids)


async def run(args: argparse.Namespace) -> dict:
    checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint("256m")
    model, processor = load(str(checkpoint))
    engine = Engine(model, processor, EngineConfig(max_context_tokens=8192))
    rounds = []
    try:
        await ttft(engine, system_prompt(-1, 64, processor), "Warm up.")
        for r in range(args.repeats):
            system = system_prompt(r, args.prefix_tokens, processor)
            cold, tokens = await ttft(engine, system, "What is the first step?")
            warm, _ = await ttft(engine, system, "And what comes after it, please?")
            rounds.append({"cold_s": cold, "warm_s": warm, "ratio": warm / cold})
            logging.info(
                "round %d: %d prompt tokens, cold %.3f s, warm %.3f s", r, tokens, cold, warm
            )
        stats = engine.stats().prompt_cache
    finally:
        engine.close()
    return {
        "model": "SmolVLM2-256M architecture, random weights, float32",
        "checkpoint": str(checkpoint),
        "prefix_tokens": args.prefix_tokens,
        "prompt_tokens": tokens,
        "repeats": args.repeats,
        "cold_ttft_s": statistics.median(r["cold_s"] for r in rounds),
        "warm_ttft_s": statistics.median(r["warm_s"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
        "cache": {
            "hits": stats.hits,
            "reused_tokens": stats.reused_tokens,
            "bytes": stats.bytes,
        },
        "blas": mlx_smolvlm.BLAS,
        "mlx": mx.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", help="another checkpoint (default: random 256M)")
    parser.add_argument("--json", default=str(RESULTS / "prompt_cache.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = asyncio.run(run(args))
    print(
        f"{report['model']}, {report['prompt_tokens']} prompt tokens, shared prefix "
        f"{report['prefix_tokens']}, median of {report['repeats']}: cold TTFT "
        f"{report['cold_ttft_s']:.3f} s, warm TTFT {report['warm_ttft_s']:.3f} s, "
        f"ratio {report['ratio']:.3f} (target <= 0.2)"
    )
    write_json(report, Path(args.json))


if __name__ == "__main__":
    main()
