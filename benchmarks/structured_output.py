"""Structured output on the engine: every answer validates, and what the constraint costs a token.

The model has random weights (the hardest case for a constraint: nothing but the mask keeps
the answer in the schema). ``--generations`` answers are sampled (temperature 1, one seed
each, ``--rows`` at a time in one batch) against `SCHEMAS` in turn; each must end with EOS,
parse and validate with `jsonschema`.

The per-token overhead is measured two ways:
- the time the matchers take (mask computation and token consumption), per constrained token;
- decode ms per token of the constrained run against the same rows unconstrained (same seeds,
  same number of tokens each, EOS ignored): this also counts what the constraint changes in
  the batch loop (a constrained row waits for its previous token before its next mask, so the
  step is not queued ahead).

Usage::

    python -m benchmarks.structured_output [--generations 16] [--rows 4] [--checkpoint DIR]

Writes ``benchmarks/results/structured_output.json``.
"""

# mlx_smolvlm goes first: it loads the optimized BLAS, which must happen before mlx.core.
from __future__ import annotations  # noqa: I001

import argparse
import asyncio
import importlib.metadata
import json
import logging
import time
from pathlib import Path

import mlx_smolvlm
import mlx.core as mx

from benchmarks import RESULTS, write_json
from mlx_smolvlm import constrain
from mlx_smolvlm.engine import Engine, EngineConfig, SamplingParams
from mlx_smolvlm.load import load
from mlx_smolvlm.random_weights import random_checkpoint

# Nested objects, arrays, enums, required fields, bounded numbers, patterns, const, anyOf.
# Strings are bounded: with random weights an unbounded string only ends at max_tokens.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
            "scores": {
                "type": "array",
                "items": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "kind": {"const": "order"},
            "paid": {"type": "boolean"},
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"enum": ["A1", "B2", "C3"]},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
            "note": {"type": "string", "maxLength": 8},
        },
        "required": ["kind", "paid", "items"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "answer": {
                "anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]
            },
            "mood": {"enum": ["happy", "sad", "neutral"]},
        },
        "required": ["answer", "mood"],
        "additionalProperties": False,
    },
]


class MatcherTimer:
    """Wraps `Constraint.mask` and `Constraint.consume` to add up the seconds they take."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.masks = 0
        self._mask, self._consume = constrain.Constraint.mask, constrain.Constraint.consume

    def __enter__(self) -> MatcherTimer:
        timer = self

        def mask(constraint: constrain.Constraint) -> mx.array:
            start = time.perf_counter()
            result = timer._mask(constraint)
            timer.seconds += time.perf_counter() - start
            timer.masks += 1
            return result

        def consume(constraint: constrain.Constraint, token: int) -> None:
            start = time.perf_counter()
            timer._consume(constraint, token)
            timer.seconds += time.perf_counter() - start

        constrain.Constraint.mask, constrain.Constraint.consume = mask, consume
        return self

    def __exit__(self, *exc: object) -> None:
        constrain.Constraint.mask, constrain.Constraint.consume = self._mask, self._consume


async def sample(engine: Engine, k: int, params: SamplingParams) -> tuple[str, object, float]:
    """One answer: its text, last output and seconds from its first token to its last."""
    prompt = [{"role": "user", "content": [{"type": "text", "text": f"Reply in JSON ({k})."}]}]
    pieces, first, last = [], None, None
    async for out in engine.generate(prompt, params=params):
        first = first or time.perf_counter()
        pieces.append(out.text)
        last = out
    return "".join(pieces), last, time.perf_counter() - first


async def run_batches(engine: Engine, params: list[SamplingParams], rows: int) -> list:
    results = []
    for start in range(0, len(params), rows):
        batch = params[start : start + rows]
        results += await asyncio.gather(
            *(sample(engine, start + i, p) for i, p in enumerate(batch))
        )
    return results


async def run(args: argparse.Namespace) -> dict:
    import jsonschema  # only here: a test dependency, not the library's

    checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint("256m")
    model, processor = load(str(checkpoint))
    engine = Engine(model, processor, EngineConfig(max_sequences=args.rows, max_queue=args.rows))
    grammars = [constrain.json_schema_grammar(schema) for schema in SCHEMAS]
    constrained = [
        SamplingParams(
            max_tokens=args.max_tokens,
            temperature=1.0,
            seed=k,
            grammar=grammars[k % len(grammars)],
        )
        for k in range(args.generations)
    ]
    try:
        await run_batches(engine, constrained[: args.rows], args.rows)  # warm-up
        with MatcherTimer() as timer:
            answers = await run_batches(engine, constrained, args.rows)
        valid = 0
        for k, (text, last, _) in enumerate(answers):
            if last.finish_reason == "stop":
                jsonschema.validate(json.loads(text), SCHEMAS[k % len(SCHEMAS)])
                valid += 1
            else:
                logging.warning("answer %d was cut at max_tokens: %r", k, text[:80])
        free = [
            SamplingParams(max_tokens=len(last.tokens), temperature=1.0, seed=k, ignore_eos=True)
            for k, (_, last, _) in enumerate(answers)
        ]
        plain = await run_batches(engine, free, args.rows)
    finally:
        engine.close()
    tokens = sum(len(last.tokens) for _, last, _ in answers)
    # Per row, decode seconds over its tokens after the first; rows of a batch run together.
    constrained_ms = 1e3 * sum(s for *_, s in answers) / max(1, tokens - len(answers))
    free_ms = 1e3 * sum(s for *_, s in plain) / max(1, tokens - len(plain))
    return {
        "model": "SmolVLM2-256M architecture, random weights, float32",
        "checkpoint": str(checkpoint),
        "generations": args.generations,
        "valid": valid,
        "rows": args.rows,
        "tokens": tokens,
        "matcher_ms_per_token": 1e3 * timer.seconds / max(1, timer.masks),
        "constrained_row_ms_per_token": constrained_ms,
        "free_row_ms_per_token": free_ms,
        "overhead": constrained_ms / free_ms - 1,
        "llguidance": importlib.metadata.version("llguidance"),
        "blas": mlx_smolvlm.BLAS,
        "mlx": mx.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--checkpoint", help="another checkpoint (default: random 256M)")
    parser.add_argument("--json", default=str(RESULTS / "structured_output.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = asyncio.run(run(args))
    print(
        f"{report['model']}: {report['valid']}/{report['generations']} answers valid, "
        f"{report['rows']} rows a batch, {report['tokens']} tokens; matchers "
        f"{report['matcher_ms_per_token']:.3f} ms a token; a row's decode "
        f"{report['constrained_row_ms_per_token']:.1f} ms/token constrained vs "
        f"{report['free_row_ms_per_token']:.1f} free ({100 * report['overhead']:+.1f}%)"
    )
    write_json(report, Path(args.json))


if __name__ == "__main__":
    main()
